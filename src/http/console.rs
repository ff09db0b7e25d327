//! The operator console (`GET /`, `/console/`): one static page, embedded in the binary,
//! that reads and acts through this replica's public `/api` with the operator's token.
//!
//! The page holds no secret and adds no write path: every action is an `/api` call the
//! page makes with `Authorization: Bearer <token>` (asked once per tab, kept in
//! `sessionStorage`), so `API_TOKEN` protects exactly what it protected before. All
//! URLs in the page are relative (`../api/...`), so it works on a replica's own port,
//! behind the compose nginx, a Kubernetes Service, or a proxy that adds a path prefix.
//! The page is not in `/openapi.json` (it is not JSON API); [`allowed_methods`] gives
//! its paths their 405.

use warp::Filter;
use warp::filters::BoxedFilter;
use warp::http::{HeaderValue, StatusCode, header};
use warp::reply::{Reply, Response};

/// Where `/` sends a browser; relative, so a path prefix in front of the API is kept.
const HOME: &str = "console/";

/// Revalidate every time: the page and its script change with the binary, and
/// replicas behind one Service may briefly run different versions.
const NO_CACHE: &str = "no-cache";
/// The vendored library's path names its version, so it never changes.
const IMMUTABLE: &str = "public, max-age=31536000, immutable";

/// Scripts and data only from this origin; uPlot sets inline styles.
const CSP: &str = "default-src 'none'; script-src 'self'; style-src 'self' 'unsafe-inline'; \
                   img-src 'self' data:; connect-src 'self'; base-uri 'none'; \
                   form-action 'self'; frame-ancestors 'none'";

struct Asset {
    path: &'static str,
    content_type: &'static str,
    cache: &'static str,
    body: &'static [u8],
}

const ASSETS: &[Asset] = &[
    Asset {
        path: "",
        content_type: "text/html; charset=utf-8",
        cache: NO_CACHE,
        body: include_bytes!("console/index.html"),
    },
    Asset {
        path: "console.js",
        content_type: "text/javascript; charset=utf-8",
        cache: NO_CACHE,
        body: include_bytes!("console/console.js"),
    },
    Asset {
        path: "console.css",
        content_type: "text/css; charset=utf-8",
        cache: NO_CACHE,
        body: include_bytes!("console/console.css"),
    },
    Asset {
        path: "vendor/uplot-1.6.32/uPlot.iife.min.js",
        content_type: "text/javascript; charset=utf-8",
        cache: IMMUTABLE,
        body: include_bytes!("console/vendor/uplot-1.6.32/uPlot.iife.min.js"),
    },
    Asset {
        path: "vendor/uplot-1.6.32/uPlot.min.css",
        content_type: "text/css; charset=utf-8",
        cache: IMMUTABLE,
        body: include_bytes!("console/vendor/uplot-1.6.32/uPlot.min.css"),
    },
    Asset {
        path: "vendor/uplot-1.6.32/LICENSE",
        content_type: "text/plain; charset=utf-8",
        cache: IMMUTABLE,
        body: include_bytes!("console/vendor/uplot-1.6.32/LICENSE"),
    },
];

fn asset(path: &str) -> Option<&'static Asset> {
    ASSETS.iter().find(|a| a.path == path)
}

pub fn routes() -> BoxedFilter<(Response,)> {
    let home = warp::path::end().and(warp::get()).map(|| redirect(HOME));
    let console = warp::path("console")
        .and(warp::get())
        .and(warp::path::full())
        .and(warp::path::tail())
        .and_then(
            |full: warp::path::FullPath, tail: warp::path::Tail| async move {
                // "/console" without its slash would resolve the page's relative URLs
                // against "/": send it to "/console/".
                if full.as_str().ends_with("/console") {
                    return Ok(redirect(HOME));
                }
                asset(tail.as_str())
                    .map(serve)
                    .ok_or_else(warp::reject::not_found)
            },
        );
    home.or(console).unify().boxed()
}

fn redirect(location: &'static str) -> Response {
    let mut response = StatusCode::SEE_OTHER.into_response();
    response
        .headers_mut()
        .insert(header::LOCATION, HeaderValue::from_static(location));
    response
}

fn serve(asset: &'static Asset) -> Response {
    let mut response = Response::new(asset.body.into());
    let headers = response.headers_mut();
    headers.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static(asset.content_type),
    );
    headers.insert(header::CACHE_CONTROL, HeaderValue::from_static(asset.cache));
    headers.insert(
        header::X_CONTENT_TYPE_OPTIONS,
        HeaderValue::from_static("nosniff"),
    );
    headers.insert(
        header::REFERRER_POLICY,
        HeaderValue::from_static("no-referrer"),
    );
    if asset.content_type.starts_with("text/html") {
        headers.insert(
            header::CONTENT_SECURITY_POLICY,
            HeaderValue::from_static(CSP),
        );
        headers.insert(header::X_FRAME_OPTIONS, HeaderValue::from_static("DENY"));
    }
    response
}

/// The methods the console's paths take (for the `Allow` header of a 405); empty for
/// any other path.
pub fn allowed_methods(path: &str) -> Vec<String> {
    if route_template(path).is_some() {
        vec!["GET".into()]
    } else {
        Vec::new()
    }
}

/// The console's route a path is (for metric labels), if it is one.
pub fn route_template(path: &str) -> Option<&'static str> {
    match path {
        "/" => Some("/"),
        "/console" => Some("/console"),
        _ => path
            .strip_prefix("/console/")
            .is_some_and(|tail| asset(tail).is_some())
            .then_some("/console/{asset}"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_asset_is_embedded_and_the_page_names_only_embedded_files() {
        let page = std::str::from_utf8(asset("").expect("index").body).expect("utf-8");
        for asset in ASSETS {
            assert!(!asset.body.is_empty(), "{} is empty", asset.path);
        }
        for name in [
            "console.js",
            "console.css",
            "vendor/uplot-1.6.32/uPlot.iife.min.js",
        ] {
            assert!(
                page.contains(&format!("\"{name}\"")),
                "index.html lacks {name}"
            );
        }
        // No CDN, font service or any other origin at run time.
        for asset in ASSETS.iter().filter(|a| !a.path.ends_with("LICENSE")) {
            let text = String::from_utf8_lossy(asset.body);
            let external = text.matches("http://").count() + text.matches("https://").count();
            let allowed = text.matches("https://github.com/leeoniya/uPlot").count()
                + text.matches("http://www.w3.org/2000/svg").count();
            assert!(external <= allowed, "{} names another origin", asset.path);
        }
    }

    #[test]
    fn console_paths_take_get_only() {
        assert_eq!(allowed_methods("/"), vec!["GET"]);
        assert_eq!(allowed_methods("/console/"), vec!["GET"]);
        assert_eq!(allowed_methods("/console/console.js"), vec!["GET"]);
        assert!(allowed_methods("/console/nope.js").is_empty());
        assert!(allowed_methods("/api/messages").is_empty());
    }
}
