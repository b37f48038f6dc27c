//! `Browser`: headless Chromium driven through chromedriver (WebDriver, `fantoccini`), on
//! loopback only, with its own profile and download dir, saving screenshots for reviewers.
//!
//! Invariants: a missing browser or driver is an error, never a skip (CI must run these tests);
//! chromedriver runs in its own process group, and that whole group (Chromium included) is
//! killed when the `Browser` is dropped, so a failing test leaves no browser behind.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use anyhow::{Context, bail};
use fantoccini::{Client, ClientBuilder, Locator};
use serde_json::{Value, json};

/// How long a wait for something on the page lasts by default.
pub const WAIT: Duration = Duration::from_secs(20);

pub struct Browser {
    pub client: Client,
    driver: Child,
    _profile: tempfile::TempDir,
    /// Where Chromium saves downloads.
    pub downloads: PathBuf,
    /// Where `screenshot` writes PNG files.
    pub screenshots: PathBuf,
}

/// A binary from `env` or one of `names` on PATH / in /usr/bin.
fn find(env: &str, names: &[&str]) -> anyhow::Result<PathBuf> {
    if let Some(p) = std::env::var_os(env) {
        return Ok(PathBuf::from(p));
    }
    let path = std::env::var_os("PATH").unwrap_or_default();
    for name in names {
        for dir in std::env::split_paths(&path).chain([PathBuf::from("/usr/bin")]) {
            let p = dir.join(name);
            if p.is_file() {
                return Ok(p);
            }
        }
    }
    bail!(
        "{} not found (set {env} or run scripts/install-test-deps, which installs Debian's \
         chromium and chromium-driver)",
        names.join(" or ")
    )
}

/// The directory screenshots of `suite` go to: `<target dir>/ui-screenshots/<suite>`.
pub fn screenshot_dir(suite: &str) -> PathBuf {
    let target = std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| Path::new(env!("CARGO_MANIFEST_DIR")).join("../target"));
    target.join("ui-screenshots").join(suite)
}

fn free_port() -> anyhow::Result<u16> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port())
}

impl Browser {
    /// Starts chromedriver and a headless Chromium session; screenshots go to
    /// `screenshot_dir(suite)` (printed once).
    pub async fn start(suite: &str) -> anyhow::Result<Browser> {
        let chromium = find("RUNYARD_CHROMIUM", &["chromium", "chromium-browser"])?;
        let chromedriver = find("RUNYARD_CHROMEDRIVER", &["chromedriver"])?;
        let profile = tempfile::tempdir()?;
        let downloads = profile.path().join("downloads");
        std::fs::create_dir_all(&downloads)?;
        let screenshots = screenshot_dir(suite);
        std::fs::create_dir_all(&screenshots)?;
        println!("ui screenshots: {}", screenshots.display());

        let port = free_port()?;
        let driver = {
            use std::os::unix::process::CommandExt;
            Command::new(&chromedriver)
                .arg(format!("--port={port}"))
                .stdin(Stdio::null())
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .process_group(0)
                .spawn()
                .with_context(|| format!("starting {}", chromedriver.display()))?
        };
        let mut browser_guard = DriverGuard(Some(driver));
        let url = format!("http://127.0.0.1:{port}");
        let probe = reqwest::Client::new();
        crate::eventually(Duration::from_secs(20), "chromedriver ready", || async {
            let r = probe.get(format!("{url}/status")).send().await.ok()?;
            let v: Value = r.json().await.ok()?;
            (v["value"]["ready"] == true).then_some(())
        })
        .await?;

        let args = [
            "--headless=new".to_string(),
            "--no-sandbox".into(),
            "--disable-gpu".into(),
            "--disable-quic".into(),
            "--no-first-run".into(),
            "--disable-background-networking".into(),
            "--disable-component-update".into(),
            "--disable-sync".into(),
            "--disable-dev-shm-usage".into(),
            "--window-size=1280,900".into(),
            format!(
                "--user-data-dir={}",
                profile.path().join("profile").display()
            ),
        ];
        let caps = json!({
            "browserName": "chrome",
            "goog:chromeOptions": {
                "binary": chromium,
                "args": args,
                "prefs": {
                    "download.default_directory": downloads,
                    "download.prompt_for_download": false,
                    "download.directory_upgrade": true,
                    "safebrowsing.enabled": false,
                },
            },
        });
        let caps = match caps {
            Value::Object(m) => m,
            _ => unreachable!("a JSON object literal"),
        };
        let client = ClientBuilder::native()
            .capabilities(caps)
            .connect(&url)
            .await
            .context("starting a Chromium session through chromedriver")?;
        Ok(Browser {
            client,
            driver: browser_guard.0.take().expect("guard holds the driver"),
            _profile: profile,
            downloads,
            screenshots,
        })
    }

    /// Ends the session (closing Chromium), then chromedriver.
    pub async fn close(self) -> anyhow::Result<()> {
        let closed = self.client.clone().close().await;
        drop(self);
        closed.context("closing the browser session")
    }

    pub async fn goto(&self, url: &str) -> anyhow::Result<()> {
        self.client
            .goto(url)
            .await
            .with_context(|| format!("goto {url}"))
    }

    /// Saves a PNG of the viewport as `<screenshots>/<name>.png`.
    pub async fn screenshot(&self, name: &str) -> anyhow::Result<PathBuf> {
        let png = self.client.screenshot().await.context("screenshot")?;
        let path = self.screenshots.join(format!("{name}.png"));
        std::fs::write(&path, png)?;
        println!("screenshot: {}", path.display());
        Ok(path)
    }

    /// Runs `script` (a function body; `arguments[i]` are `args`) in the page.
    pub async fn js(&self, script: &str, args: Vec<Value>) -> anyhow::Result<Value> {
        self.client
            .execute(script, args)
            .await
            .with_context(|| format!("running script: {script}"))
    }

    /// The text of the first element matching `css`, or `None` if there is none.
    pub async fn text(&self, css: &str) -> anyhow::Result<Option<String>> {
        let v = self
            .js(
                "const e = document.querySelector(arguments[0]); return e ? e.textContent : null;",
                vec![json!(css)],
            )
            .await?;
        Ok(v.as_str().map(str::to_string))
    }

    /// Waits until `css` matches a visible element.
    pub async fn wait_for(&self, css: &str) -> anyhow::Result<()> {
        self.wait_until(&format!("`{css}` visible"), WAIT, || async {
            let v = self
                .js(
                    "const e = document.querySelector(arguments[0]); return !!(e && e.offsetParent !== null);",
                    vec![json!(css)],
                )
                .await
                .ok()?;
            (v == true).then_some(())
        })
        .await
    }

    /// Waits until the text of `css` satisfies `ok`; returns that text.
    pub async fn wait_text(
        &self,
        css: &str,
        timeout: Duration,
        ok: impl Fn(&str) -> bool,
    ) -> anyhow::Result<String> {
        let deadline = tokio::time::Instant::now() + timeout;
        let mut last = None;
        loop {
            if let Some(t) = self.text(css).await? {
                if ok(&t) {
                    return Ok(t);
                }
                last = Some(t);
            }
            if tokio::time::Instant::now() > deadline {
                bail!(
                    "timed out after {timeout:?} waiting for the text of `{css}`; last: {last:?}"
                );
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// Polls `f` until it returns `Some`, for at most `timeout`.
    pub async fn wait_until<T, F, Fut>(
        &self,
        what: &str,
        timeout: Duration,
        f: F,
    ) -> anyhow::Result<T>
    where
        F: FnMut() -> Fut,
        Fut: std::future::Future<Output = Option<T>>,
    {
        crate::eventually(timeout, what, f).await
    }

    /// Replaces the value of the input or textarea matching `css` by typing `text`.
    pub async fn fill(&self, css: &str, text: &str) -> anyhow::Result<()> {
        let e = self
            .client
            .find(Locator::Css(css))
            .await
            .with_context(|| format!("find {css}"))?;
        e.clear().await.with_context(|| format!("clear {css}"))?;
        if !text.is_empty() {
            e.send_keys(text)
                .await
                .with_context(|| format!("type into {css}"))?;
        }
        Ok(())
    }

    pub async fn click(&self, css: &str) -> anyhow::Result<()> {
        self.wait_for(css).await?;
        self.client
            .find(Locator::Css(css))
            .await
            .with_context(|| format!("find {css}"))?
            .click()
            .await
            .with_context(|| format!("click {css}"))?;
        Ok(())
    }

    /// The page's location hash (`#/runs/ID`).
    pub async fn hash(&self) -> anyhow::Result<String> {
        Ok(self
            .js("return location.hash;", vec![])
            .await?
            .as_str()
            .unwrap_or("")
            .to_string())
    }
}

impl Drop for Browser {
    fn drop(&mut self) {
        kill_group(&mut self.driver);
    }
}

/// Kills chromedriver's process group (Chromium runs in it) if startup fails half-way.
struct DriverGuard(Option<Child>);

impl Drop for DriverGuard {
    fn drop(&mut self) {
        if let Some(c) = self.0.as_mut() {
            kill_group(c);
        }
    }
}

fn kill_group(child: &mut Child) {
    if let Ok(pid) = i32::try_from(child.id()) {
        let _ = nix::sys::signal::killpg(
            nix::unistd::Pid::from_raw(pid),
            nix::sys::signal::Signal::SIGKILL,
        );
    }
    let _ = child.wait();
}
