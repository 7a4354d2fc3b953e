//! Issue 12: `src/main.rs` is read top to bottom as a teaching file. These checks keep the shape
//! the README promises: the six parts in their order, and no function too long to read at once.
//! They read the source as text; no server is started.

const MAIN_RS: &str = include_str!("../src/main.rs");

/// Longest function body, in lines from `fn` to its closing brace (comments included).
const MAX_FUNCTION_LINES: usize = 60;

#[test]
fn the_six_parts_come_in_order() {
    let parts = [
        "// 1. Configuration",
        "// 2. Models",
        "// 3. Database pool",
        "// 4. Auth extractor",
        "// 5. Routes",
        "// 6. Startup",
    ];
    let lines: Vec<&str> = MAIN_RS.lines().collect();
    let mut previous = 0;
    for part in parts {
        let found: Vec<usize> = (lines.iter().enumerate())
            .filter(|(_, line)| line.trim_end() == part)
            .map(|(at, _)| at)
            .collect();
        assert_eq!(
            found.len(),
            1,
            "{part:?} should head exactly one section: {found:?}"
        );
        assert!(
            found[0] > previous,
            "{part:?} comes before the part above it"
        );
        previous = found[0];
    }
}

/// Every `fn` (not a declaration ending in `;`) with the number of lines to the `}` that closes it
/// at the same indentation.
fn function_lengths() -> Vec<(String, usize, usize)> {
    let lines: Vec<&str> = MAIN_RS.lines().collect();
    let mut functions = Vec::new();
    for (at, line) in lines.iter().enumerate() {
        let code = line.trim_start();
        let indent = &line[..line.len() - code.len()];
        let signature = ["fn ", "async fn ", "pub fn ", "unsafe extern \"C\" fn "]
            .iter()
            .find_map(|prefix| code.strip_prefix(prefix));
        let Some(signature) = signature else { continue };
        let name: String = signature
            .chars()
            .take_while(|c| c.is_alphanumeric() || *c == '_')
            .collect();
        // A declaration (in a trait or an `extern` block) has no body.
        let body_start = lines[at..]
            .iter()
            .position(|l| l.contains('{') || l.ends_with(';'));
        if body_start.is_some_and(|offset| !lines[at + offset].contains('{')) {
            continue;
        }
        let closing = format!("{indent}}}");
        let end = (lines[at..].iter())
            .position(|l| l.trim_end() == closing)
            .unwrap_or_else(|| panic!("fn {name} at line {} has no closing brace", at + 1));
        functions.push((name, at + 1, end + 1));
    }
    functions
}

#[test]
fn no_function_is_longer_than_sixty_lines() {
    let functions = function_lengths();
    assert!(
        functions.iter().any(|(name, _, _)| name == "main")
            && functions.iter().any(|(name, _, _)| name == "list_tasks"),
        "the scan should find main and the handlers: {functions:?}"
    );
    let too_long: Vec<_> = (functions.iter())
        .filter(|(_, _, lines)| *lines > MAX_FUNCTION_LINES)
        .collect();
    assert!(
        too_long.is_empty(),
        "functions over {MAX_FUNCTION_LINES} lines (name, line, length): {too_long:?}"
    );
}
