//! Issue 5, in a real browser: headless Chromium opens the Swagger UI that the binary serves at
//! `/docs`, authorizes through the OAuth2 password flow (`/token`) with an email and password,
//! runs "Try it out" → "Execute" on `GET /api/users/me`, and sees the user's email.
//!
//! Needs Debian's `chromium` and `chromium-driver`. Without them the test says plainly that it
//! was skipped, unless `CI=true`, where it fails. SQLite only (the browser does not care).

mod common;
use common::*;

use std::io::Write;
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use fantoccini::{Client as Browser, ClientBuilder, Locator};

const CHROMIUM: &str = "/usr/bin/chromium";
const CHROMEDRIVER: &str = "/usr/bin/chromedriver";
/// Debian's /usr/bin/chromium is a wrapper script; the real binary lives here.
const CHROMIUM_REAL: &str = "/usr/lib/chromium/chromium";

const EMAIL: &str = "swagger.user@example.com";

/// How long any one step may take before the test gives up (wide: the machine is shared).
const STEP: Duration = Duration::from_secs(30);

/// chromedriver, killed when dropped.
struct Driver {
    child: Child,
    port: u16,
}

impl Drop for Driver {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("free port")
}

fn start_chromedriver(log_dir: &Path) -> Driver {
    let port = free_port();
    let log = std::fs::File::create(log_dir.join("chromedriver.log")).expect("chromedriver log");
    let child = Command::new(CHROMEDRIVER)
        .arg(format!("--port={port}"))
        .arg(format!(
            "--log-path={}",
            log_dir.join("chromedriver-verbose.log").display()
        ))
        .stdin(Stdio::null())
        .stdout(log.try_clone().unwrap())
        .stderr(log)
        .spawn()
        .expect("spawn chromedriver");
    let driver = Driver { child, port };
    let status_url = format!("http://127.0.0.1:{port}/status");
    let http = reqwest::blocking::Client::builder()
        .timeout(Duration::from_secs(2))
        .build()
        .unwrap();
    let started = Instant::now();
    loop {
        if let Ok(response) = http.get(&status_url).send() {
            if response.status().is_success() {
                return driver;
            }
        }
        assert!(
            started.elapsed() < STEP,
            "chromedriver did not answer on port {port} (log in {})",
            log_dir.display()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

fn skip_or_fail(reason: &str) {
    if std::env::var("CI").as_deref() == Ok("true") {
        panic!("CI=true but {reason}: install Debian's chromium and chromium-driver");
    }
    let _ = writeln!(
        std::io::stderr(),
        "\n*** browser test SKIPPED: {reason} (apt-get install chromium chromium-driver) ***\n"
    );
}

#[test]
fn swagger_ui_authorizes_with_password_and_calls_users_me() {
    for path in [CHROMIUM, CHROMEDRIVER] {
        if !Path::new(path).exists() {
            skip_or_fail(&format!("{path} is missing"));
            return;
        }
    }

    let srv = start(&Backend::Sqlite);
    let user = srv.register(EMAIL, PASSWORD);
    assert_eq!(user["email"], EMAIL);

    // Kept after the test, for screenshots and logs when it fails.
    let debug_dir: PathBuf = tempfile::Builder::new()
        .prefix("todo-api-browser-")
        .tempdir()
        .expect("temp dir")
        .keep();
    let profile = tempfile::tempdir().expect("profile dir");
    let driver = start_chromedriver(&debug_dir);

    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let outcome = runtime.block_on(async {
        let browser = connect(driver.port, profile.path()).await?;
        let result = drive(&browser, &srv.base_url).await;
        if let Err(failure) = &result {
            let shot = debug_dir.join("failure.png");
            let saved = match browser.screenshot().await {
                Ok(png) => std::fs::write(&shot, png)
                    .map(|_| format!("screenshot: {}", shot.display()))
                    .unwrap_or_else(|e| format!("screenshot not written: {e}")),
                Err(e) => format!("no screenshot: {e}"),
            };
            if let Ok(source) = browser.source().await {
                let _ = std::fs::write(debug_dir.join("failure.html"), source);
            }
            let _ = browser.close().await;
            return Err(format!(
                "{failure}\n{saved}\npage source and chromedriver logs in {}",
                debug_dir.display()
            ));
        }
        let _ = browser.close().await;
        result
    });
    drop(driver);
    if let Err(failure) = outcome {
        panic!("{failure}\nserver log:\n{}", srv.log());
    }
    let _ = std::fs::remove_dir_all(&debug_dir);
}

async fn connect(port: u16, profile: &Path) -> Result<Browser, String> {
    let binary = if Path::new(CHROMIUM_REAL).exists() {
        CHROMIUM_REAL
    } else {
        CHROMIUM
    };
    let capabilities = json!({
        "browserName": "chrome",
        "goog:chromeOptions": {
            "binary": binary,
            "args": [
                "--headless",
                "--no-sandbox",
                "--disable-gpu",
                "--disable-quic",
                "--no-first-run",
                "--disable-background-networking",
                "--disable-component-update",
                "--disable-sync",
                "--disable-dev-shm-usage",
                "--window-size=1280,1600",
                format!("--user-data-dir={}", profile.display()),
            ],
        },
    });
    let Value::Object(capabilities) = capabilities else {
        unreachable!()
    };
    ClientBuilder::new(hyper_util::client::legacy::connect::HttpConnector::new())
        .capabilities(capabilities)
        .connect(&format!("http://127.0.0.1:{port}"))
        .await
        .map_err(|e| format!("could not start a Chromium session through chromedriver: {e}"))
}

async fn wait_for(
    browser: &Browser,
    what: &str,
    locator: Locator<'_>,
) -> Result<fantoccini::elements::Element, String> {
    browser
        .wait()
        .at_most(STEP)
        .every(Duration::from_millis(100))
        .for_element(locator)
        .await
        .map_err(|e| format!("{what}: not found within {STEP:?}: {e}"))
}

async fn click(browser: &Browser, what: &str, locator: Locator<'_>) -> Result<(), String> {
    let element = wait_for(browser, what, locator).await?;
    // The element may be found before React has settled; retry a click that is intercepted.
    let started = Instant::now();
    loop {
        match element.click().await {
            Ok(()) => return Ok(()),
            Err(_) if started.elapsed() < STEP => {
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
            Err(e) => return Err(format!("{what}: click failed: {e}")),
        }
    }
}

/// Polls the text of the first element matching `css` until `done` says yes.
async fn wait_for_text(
    browser: &Browser,
    what: &str,
    css: &str,
    done: impl Fn(&str) -> bool,
) -> Result<String, String> {
    let started = Instant::now();
    let mut last = String::new();
    while started.elapsed() < STEP {
        if let Ok(element) = browser.find(Locator::Css(css)).await {
            if let Ok(text) = element.text().await {
                if done(&text) {
                    return Ok(text);
                }
                last = text;
            }
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    Err(format!(
        "{what}: not seen within {STEP:?}; last text of {css}: {last:?}"
    ))
}

async fn drive(browser: &Browser, base_url: &str) -> Result<(), String> {
    browser
        .goto(&format!("{base_url}/docs"))
        .await
        .map_err(|e| format!("open /docs: {e}"))?;

    // The operations render once the document is loaded.
    let me_block = "//div[contains(@class,'opblock-get')][.//*[@data-path='/api/users/me']]";
    wait_for(
        browser,
        "the GET /api/users/me operation",
        Locator::XPath(me_block),
    )
    .await?;

    // Authorize: the OAuth2 password flow, with an email as the username.
    click(
        browser,
        "the Authorize button",
        Locator::Css(".auth-wrapper button.authorize"),
    )
    .await?;
    let username = wait_for(
        browser,
        "the OAuth2 username field",
        Locator::Id("oauth_username"),
    )
    .await?;
    username
        .send_keys(EMAIL)
        .await
        .map_err(|e| format!("type the username: {e}"))?;
    let password = wait_for(
        browser,
        "the OAuth2 password field",
        Locator::Id("oauth_password"),
    )
    .await?;
    password
        .send_keys(PASSWORD)
        .await
        .map_err(|e| format!("type the password: {e}"))?;
    click(
        browser,
        "the OAuth2 Authorize button",
        Locator::Css("button[aria-label='Apply given OAuth2 credentials']"),
    )
    .await?;
    // Authorized: the OAuth2 section now offers Logout; otherwise Swagger UI shows an error.
    let logout = "button.authorize[aria-label='Remove authorization']";
    if let Err(e) = wait_for(
        browser,
        "OAuth2 authorization (the Logout button)",
        Locator::Css(logout),
    )
    .await
    {
        let errors = match browser.find(Locator::Css(".auth-container .errors")).await {
            Ok(el) => el.text().await.unwrap_or_default(),
            Err(_) => String::new(),
        };
        return Err(format!("{e}\nSwagger UI's auth errors: {errors:?}"));
    }
    click(
        browser,
        "the Close button of the authorization dialog",
        Locator::XPath(
            "//button[@aria-label='Remove authorization' and contains(@class,'authorize')]\
             /following-sibling::button[contains(@class,'btn-done')]",
        ),
    )
    .await?;
    // The dialog is gone.
    let started = Instant::now();
    while browser
        .find(Locator::Css(".dialog-ux .modal-ux"))
        .await
        .is_ok()
    {
        if started.elapsed() > STEP {
            return Err("the authorization dialog did not close".into());
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }

    // GET /api/users/me: expand, Try it out, Execute.
    click(
        browser,
        "the GET /api/users/me summary",
        Locator::XPath(&format!(
            "{me_block}//*[contains(@class,'opblock-summary-control')]"
        )),
    )
    .await?;
    click(
        browser,
        "Try it out",
        Locator::XPath(&format!(
            "{me_block}//button[contains(@class,'try-out__btn')]"
        )),
    )
    .await?;
    click(
        browser,
        "Execute",
        Locator::XPath(&format!("{me_block}//button[contains(@class,'execute')]")),
    )
    .await?;

    // The live response shows 200 and the user's email; the request carried the token.
    let status_css = ".opblock-get .live-responses-table .response .response-col_status";
    let status = wait_for_text(browser, "the response status", status_css, |t| {
        !t.trim().is_empty()
    })
    .await?;
    let body_css = ".opblock-get .live-responses-table .response .response-col_description";
    let body = wait_for_text(browser, "the response body", body_css, |t| {
        t.contains(EMAIL)
    })
    .await;
    let curl = browser
        .find(Locator::Css(
            ".opblock-get .curl-command, .opblock-get .curl",
        ))
        .await
        .map_err(|e| format!("the curl command: {e}"));
    let curl = match curl {
        Ok(el) => el.text().await.unwrap_or_default(),
        Err(e) => e,
    };
    let body = body.map_err(|e| format!("{e}\nstatus: {status:?}\nrequest: {curl}"))?;
    if !status.trim().starts_with("200") {
        return Err(format!(
            "GET /api/users/me answered {status:?}: {body}\nrequest: {curl}"
        ));
    }
    if !curl.contains("Authorization: Bearer ") {
        return Err(format!(
            "the request did not carry the bearer token: {curl}"
        ));
    }
    Ok(())
}
