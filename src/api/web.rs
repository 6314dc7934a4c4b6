//! The web dashboard: the files of `web/`, embedded in the binary at build time
//! (`include_bytes!`: one binary to deploy, the same bytes in debug and release builds, nothing
//! fetched from elsewhere), served at `/` and beside it.
//!
//! These routes sit outside the identity middleware: the page holds no data and must load even
//! where anonymous reads are off, so the user can paste a token into it. Every answer carries
//! an `ETag` (revalidated with `Cache-Control: no-cache`, so a new daemon's files show at once
//! and unchanged ones cost a 304), and the page a strict Content-Security-Policy: scripts and
//! connections only from this origin, which also keeps the token in `localStorage` away from
//! injected scripts.

use std::sync::OnceLock;

use axum::Router;
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use sha2::{Digest, Sha256};

use super::AppState;

/// One embedded file.
pub struct Asset {
    /// Path under `web/` and under `/` in URLs.
    pub path: &'static str,
    pub content_type: &'static str,
    pub bytes: &'static [u8],
}

macro_rules! asset {
    ($path:literal, $ct:literal) => {
        Asset {
            path: $path,
            content_type: $ct,
            bytes: include_bytes!(concat!(env!("CARGO_MANIFEST_DIR"), "/web/", $path)),
        }
    };
}

/// Every file of `web/` (a unit test checks that none is missing).
pub static ASSETS: &[Asset] = &[
    asset!("index.html", "text/html; charset=utf-8"),
    asset!("app.css", "text/css; charset=utf-8"),
    asset!("favicon.svg", "image/svg+xml"),
    asset!("js/main.js", "text/javascript; charset=utf-8"),
    asset!("js/api.js", "text/javascript; charset=utf-8"),
    asset!("js/util.js", "text/javascript; charset=utf-8"),
    asset!("js/queue.js", "text/javascript; charset=utf-8"),
    asset!("js/gpus.js", "text/javascript; charset=utf-8"),
    asset!("js/job.js", "text/javascript; charset=utf-8"),
    asset!("js/schedules.js", "text/javascript; charset=utf-8"),
    asset!("js/sweep.js", "text/javascript; charset=utf-8"),
    asset!(
        "vendor/uplot/uPlot.iife.min.js",
        "text/javascript; charset=utf-8"
    ),
    asset!("vendor/uplot/uPlot.min.css", "text/css; charset=utf-8"),
    asset!("vendor/uplot/LICENSE", "text/plain; charset=utf-8"),
    asset!("vendor/README.md", "text/plain; charset=utf-8"),
];

/// Only this origin: no inline scripts or styles, no other hosts. (Scripts still position
/// things through `element.style`, which CSP does not restrict.)
const CSP: &str = "default-src 'none'; script-src 'self'; style-src 'self'; \
                   img-src 'self' data:; connect-src 'self'; font-src 'self'; \
                   base-uri 'none'; form-action 'none'; frame-ancestors 'none'";

/// The dashboard's routes: `/` and `/<path>` for each asset.
pub fn routes() -> Router<AppState> {
    let index = ASSETS
        .iter()
        .position(|a| a.path == "index.html")
        .expect("web/index.html is embedded");
    let mut router = Router::new().route(
        "/",
        get(move |h: HeaderMap| async move { serve(index, &h) }),
    );
    for (i, a) in ASSETS.iter().enumerate() {
        router = router.route(
            &format!("/{}", a.path),
            get(move |h: HeaderMap| async move { serve(i, &h) }),
        );
    }
    router
}

fn etags() -> &'static [String] {
    static ETAGS: OnceLock<Vec<String>> = OnceLock::new();
    ETAGS.get_or_init(|| {
        ASSETS
            .iter()
            .map(|a| format!("\"{}\"", &hex::encode(Sha256::digest(a.bytes))[..20]))
            .collect()
    })
}

fn serve(i: usize, req: &HeaderMap) -> Response {
    let asset = &ASSETS[i];
    let etag = &etags()[i];
    let mut headers = HeaderMap::new();
    headers.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-cache"));
    headers.insert(header::ETAG, HeaderValue::from_str(etag).expect("hex etag"));
    headers.insert(
        header::X_CONTENT_TYPE_OPTIONS,
        HeaderValue::from_static("nosniff"),
    );
    if asset.path == "index.html" {
        headers.insert(
            header::CONTENT_SECURITY_POLICY,
            HeaderValue::from_static(CSP),
        );
        headers.insert(
            header::REFERRER_POLICY,
            HeaderValue::from_static("no-referrer"),
        );
    }
    let fresh = req
        .get(header::IF_NONE_MATCH)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.split(',').any(|t| t.trim() == etag || t.trim() == "*"));
    if fresh {
        return (StatusCode::NOT_MODIFIED, headers).into_response();
    }
    headers.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static(asset.content_type),
    );
    (headers, asset.bytes).into_response()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A file added to `web/` but not to [`ASSETS`] would be missing from the binary.
    #[test]
    fn every_file_of_web_is_embedded() {
        fn walk(dir: &std::path::Path, root: &std::path::Path, out: &mut Vec<String>) {
            for e in std::fs::read_dir(dir).unwrap() {
                let p = e.unwrap().path();
                if p.is_dir() {
                    walk(&p, root, out);
                } else {
                    out.push(p.strip_prefix(root).unwrap().display().to_string());
                }
            }
        }
        let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("web");
        let mut on_disk = Vec::new();
        walk(&root, &root, &mut on_disk);
        on_disk.sort();
        let mut embedded: Vec<String> = ASSETS.iter().map(|a| a.path.to_string()).collect();
        embedded.sort();
        assert_eq!(on_disk, embedded);
    }

    /// The page must work without internet: nothing it loads may come from another host.
    #[test]
    fn the_page_loads_nothing_from_other_hosts() {
        let index = ASSETS.iter().find(|a| a.path == "index.html").unwrap();
        let html = std::str::from_utf8(index.bytes).unwrap();
        for attr in ["src=\"", "href=\""] {
            for part in html.split(attr).skip(1) {
                let url = part.split('"').next().unwrap();
                assert!(
                    !url.contains("//") && !url.starts_with("http"),
                    "{url} is not a local path"
                );
            }
        }
        for a in ASSETS
            .iter()
            .filter(|a| a.path.ends_with(".js") && !a.path.contains("vendor"))
        {
            let js = std::str::from_utf8(a.bytes).unwrap();
            assert!(
                !js.contains("http://") && !js.contains("https://"),
                "{}",
                a.path
            );
        }
    }

    #[test]
    fn etags_revalidate() {
        let mut h = HeaderMap::new();
        let full = serve(1, &h);
        assert_eq!(full.status(), StatusCode::OK);
        let etag = full.headers()[header::ETAG].clone();
        h.insert(header::IF_NONE_MATCH, etag);
        assert_eq!(serve(1, &h).status(), StatusCode::NOT_MODIFIED);
        h.insert(header::IF_NONE_MATCH, HeaderValue::from_static("\"other\""));
        assert_eq!(serve(1, &h).status(), StatusCode::OK);
    }
}
