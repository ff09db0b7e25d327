//! The operator console: served by every replica from the binary, open (it holds no
//! secret), and reading the chart's history from `GET /api/messages/activity`. The
//! page itself is tested in a real browser by `scripts/verify/console.sh`.

use std::time::Duration;

use serde_json::Value;

use crate::support::{ReplicaSettings, TestEnv, http, wait_for};

fn no_redirects() -> reqwest::Client {
    reqwest::Client::builder()
        .redirect(reqwest::redirect::Policy::none())
        .timeout(Duration::from_secs(10))
        .build()
        .expect("http client")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_replica_serves_the_console_open_and_embedded() {
    let env = TestEnv::start().await;
    let replica = env
        .replica("r1", &ReplicaSettings::fast().api_token("console-s3cret"))
        .await;
    let client = no_redirects();

    for path in ["/", "/console"] {
        let response = client.get(replica.url(path)).send().await.unwrap();
        assert_eq!(response.status(), 303, "{path}");
        assert_eq!(response.headers()["location"], "console/", "{path}");
    }
    let page = client.get(replica.url("/console/")).send().await.unwrap();
    assert_eq!(page.status(), 200);
    let headers = page.headers().clone();
    assert_eq!(headers["content-type"], "text/html; charset=utf-8");
    assert_eq!(headers["cache-control"], "no-cache");
    assert_eq!(headers["x-content-type-options"], "nosniff");
    assert!(
        headers["content-security-policy"]
            .to_str()
            .unwrap()
            .contains("connect-src 'self'")
    );
    let html = page.text().await.unwrap();
    assert!(html.contains("<title>"), "{html}");
    assert!(!html.contains("console-s3cret"), "the page holds no secret");

    for (path, content_type, cache) in [
        (
            "/console/console.js",
            "text/javascript; charset=utf-8",
            "no-cache",
        ),
        (
            "/console/console.css",
            "text/css; charset=utf-8",
            "no-cache",
        ),
        (
            "/console/vendor/uplot-1.6.32/uPlot.iife.min.js",
            "text/javascript; charset=utf-8",
            "public, max-age=31536000, immutable",
        ),
        (
            "/console/vendor/uplot-1.6.32/LICENSE",
            "text/plain; charset=utf-8",
            "public, max-age=31536000, immutable",
        ),
    ] {
        let response = client.get(replica.url(path)).send().await.unwrap();
        assert_eq!(response.status(), 200, "{path}");
        assert_eq!(response.headers()["content-type"], content_type, "{path}");
        assert_eq!(response.headers()["cache-control"], cache, "{path}");
        assert!(!response.bytes().await.unwrap().is_empty(), "{path}");
    }

    // No write path: other methods get 405 naming GET; unknown assets a JSON 404.
    for path in ["/", "/console/", "/console/console.js"] {
        let response = client.post(replica.url(path)).send().await.unwrap();
        assert_eq!(response.status(), 405, "POST {path}");
        assert_eq!(response.headers()["allow"], "GET", "POST {path}");
    }
    let missing = client
        .get(replica.url("/console/secrets.txt"))
        .send()
        .await
        .unwrap();
    assert_eq!(missing.status(), 404);
    let body: Value = missing.json().await.unwrap();
    assert_eq!(body["error"]["code"], "not_found", "{body}");

    // The page is open; the API behind it is not.
    let status = client
        .get(replica.url("/api/messages/activity"))
        .send()
        .await
        .unwrap()
        .status();
    assert_eq!(status, 401);
}

/// The chart's data is cluster-wide: what the leader sent is read through a follower.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn activity_counts_what_the_leader_sent_and_any_replica_reads_it() {
    let env = TestEnv::start().await;
    let r1 = env.replica("r1", &ReplicaSettings::fast()).await;
    wait_for("r1 to lead", Duration::from_secs(20), || async {
        r1.is_leader().await.then_some(())
    })
    .await;
    let r2 = env.replica("r2", &ReplicaSettings::fast()).await;
    env.create_messages(&r1, &["a", "b", "c", "d", "e"]).await;
    env.wait_drained(Duration::from_secs(30)).await;

    let sent = wait_for(
        "the follower to chart the 5 sends",
        Duration::from_secs(20),
        || async {
            let (status, body) = r2.get("/api/messages/activity?minutes=5").await;
            assert_eq!(status, 200, "{body}");
            let sent: i64 = body["seconds"]
                .as_array()
                .unwrap()
                .iter()
                .map(|s| s["sent"].as_i64().unwrap())
                .sum();
            (sent == 5).then_some(body)
        },
    )
    .await;
    assert!(
        sent["from"].is_string() && sent["until"].is_string(),
        "{sent}"
    );

    for bad in ["0", "61", "x"] {
        let response = http()
            .get(r2.url(&format!("/api/messages/activity?minutes={bad}")))
            .send()
            .await
            .unwrap();
        assert_eq!(response.status(), 400, "minutes={bad}");
    }
}
