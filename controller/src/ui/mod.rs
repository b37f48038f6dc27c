//! The web page: one HTML shell plus ES modules and a stylesheet, compiled into the binary and
//! served from the API's port at `/` and `/ui/{file}`; and the server-side metric plots (`chart`).
//!
//! Invariants: the static files hold no data and need no token (everything they show comes from
//! the authenticated JSON API); nothing is built or fetched at run time; every response carries a
//! strict Content-Security-Policy (scripts and styles from this origin only).

pub mod chart;

use axum::Router;
use axum::extract::Path;
use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::get;

/// What the page may load: its own files, plots as blob images, API calls to its origin.
pub const CONTENT_SECURITY_POLICY: &str = "default-src 'none'; script-src 'self'; \
     style-src 'self'; img-src 'self' blob: data:; connect-src 'self'; base-uri 'none'; \
     form-action 'self'; frame-ancestors 'none'";

/// One embedded file: its name and contents.
type Asset = (&'static str, &'static str);

const INDEX: &str = include_str!("index.html");

macro_rules! asset {
    ($name:literal) => {
        ($name, include_str!($name))
    };
}

const ASSETS: &[Asset] = &[
    asset!("style.css"),
    asset!("app.js"),
    asset!("api.js"),
    asset!("dom.js"),
    asset!("runs.js"),
    asset!("form.js"),
    asset!("run.js"),
    asset!("log.js"),
    asset!("agents.js"),
    asset!("services.js"),
    asset!("service.js"),
    asset!("plot.js"),
];

/// The content type of an embedded file, from its extension.
fn content_type(name: &str) -> &'static str {
    if name.ends_with(".css") {
        "text/css; charset=utf-8"
    } else {
        "text/javascript; charset=utf-8"
    }
}

/// The page's routes; they need no token. Merge into the API router.
pub fn routes<S: Clone + Send + Sync + 'static>() -> Router<S> {
    Router::new()
        .route(
            "/",
            get(|| async { file("text/html; charset=utf-8", INDEX) }),
        )
        .route("/ui/{name}", get(asset))
}

async fn asset(Path(name): Path<String>) -> Response {
    match ASSETS.iter().find(|(n, _)| *n == name) {
        Some((n, body)) => file(content_type(n), body),
        None => (StatusCode::NOT_FOUND, "no such file").into_response(),
    }
}

fn file(content_type: &'static str, body: &'static str) -> Response {
    let mut resp = body.into_response();
    let h = resp.headers_mut();
    h.insert(header::CONTENT_TYPE, HeaderValue::from_static(content_type));
    // Small files that change with the binary: revalidate every time rather than go stale.
    h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-cache"));
    h.insert(
        header::CONTENT_SECURITY_POLICY,
        HeaderValue::from_static(CONTENT_SECURITY_POLICY),
    );
    h.insert(
        header::X_CONTENT_TYPE_OPTIONS,
        HeaderValue::from_static("nosniff"),
    );
    h.insert(
        header::REFERRER_POLICY,
        HeaderValue::from_static("no-referrer"),
    );
    resp
}

#[cfg(test)]
mod tests {
    use super::*;
    use axum::body::Body;
    use axum::http::Request;
    use tower::ServiceExt;

    async fn get(path: &str) -> Response {
        routes::<()>()
            .oneshot(Request::get(path).body(Body::empty()).unwrap())
            .await
            .unwrap()
    }

    #[tokio::test]
    async fn serves_the_shell_and_every_module_it_imports() {
        let r = get("/").await;
        assert_eq!(r.status(), StatusCode::OK);
        assert!(
            r.headers()[header::CONTENT_SECURITY_POLICY]
                .to_str()
                .unwrap()
                .contains("script-src 'self'")
        );
        // Every `import ... from "./x.js"` and every `/ui/...` reference resolves.
        let mut wanted = vec![];
        for text in std::iter::once(INDEX).chain(ASSETS.iter().map(|(_, body)| *body)) {
            for part in text
                .split("\"./")
                .skip(1)
                .chain(text.split("\"/ui/").skip(1))
            {
                let name = part.split('"').next().unwrap();
                if name.ends_with(".js") || name.ends_with(".css") {
                    wanted.push(name.to_string());
                }
            }
        }
        assert!(wanted.contains(&"app.js".to_string()), "{wanted:?}");
        for name in wanted {
            let r = get(&format!("/ui/{name}")).await;
            assert_eq!(r.status(), StatusCode::OK, "{name}");
            let ct = r.headers()[header::CONTENT_TYPE].to_str().unwrap();
            assert!(ct.starts_with("text/"), "{name}: {ct}");
        }
        assert_eq!(get("/ui/nope.js").await.status(), StatusCode::NOT_FOUND);
    }
}
