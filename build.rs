//! diesel's `embed_migrations!` reads `migrations/` at compile time but cannot tell cargo about
//! it, so a change that only adds a migration would ship a binary without it. Watching the
//! folder makes cargo rebuild whenever a migration is added or edited (diesel documents this).
fn main() {
    println!("cargo:rerun-if-changed=migrations");
}
