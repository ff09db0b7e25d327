//! Every route of the HTTP API: happy paths and each error shape.

use std::time::Duration;

use serde_json::{Value, json};

use crate::support::{ReplicaSettings, TestEnv, http, ms, wait_for};

async fn send(
    method: reqwest::Method,
    url: String,
    body: Option<&str>,
    token: Option<&str>,
) -> (u16, Value) {
    let mut request = http().request(method, url);
    if let Some(body) = body {
        request = request
            .header("content-type", "application/json")
            .body(body.to_string());
    }
    if let Some(token) = token {
        request = request.bearer_auth(token);
    }
    let response = request.send().await.expect("request");
    let status = response.status().as_u16();
    let text = response.text().await.unwrap();
    (
        status,
        serde_json::from_str(&text).unwrap_or(Value::String(text)),
    )
}

fn assert_error(answer: &(u16, Value), status: u16, code: &str) {
    assert_eq!(answer.0, status, "{answer:?}");
    assert_eq!(answer.1["error"]["code"], code, "{answer:?}");
    assert!(
        answer.1["error"]["message"]
            .as_str()
            .is_some_and(|m| !m.is_empty()),
        "{answer:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_route_answers_as_documented() {
    use reqwest::Method;
    let env = TestEnv::start().await;
    let replica = env
        .replica(
            "r1",
            &ReplicaSettings::fast()
                .processing_interval(ms(200))
                .batch_size(10),
        )
        .await;
    let url = |path: &str| replica.url(path);

    // Open routes.
    let (status, health) = send(Method::GET, url("/health"), None, None).await;
    assert_eq!(status, 200);
    assert_eq!(health["status"], "healthy");
    assert_eq!(health["replica_id"], "r1");
    assert!(health["version"]["version"].is_string());
    assert_eq!(
        send(Method::GET, url("/health/live"), None, None).await.0,
        200
    );
    assert_eq!(
        send(Method::GET, url("/health/ready"), None, None).await.0,
        200
    );
    let (status, version) = send(Method::GET, url("/version"), None, None).await;
    assert_eq!(status, 200);
    for field in ["version", "commit", "build_time"] {
        assert!(version[field].is_string(), "{version}");
    }

    // Create: one object → 201 object; an array → 201 array.
    let (status, one) = send(
        Method::POST,
        url("/api/messages"),
        Some(r#"{"phone_number": "+905551111111", "content": "hello"}"#),
        None,
    )
    .await;
    assert_eq!(status, 201, "{one}");
    assert_eq!(one["status"], "pending");
    assert_eq!(one["phone_number"], "+905551111111");
    let id = one["id"].as_i64().unwrap();
    let (status, many) = send(
        Method::POST,
        url("/api/messages"),
        Some(r#"[{"phone_number": "+905551111112", "content": "a"}, {"phone_number": "+905551111113", "content": "b"}]"#),
        None,
    )
    .await;
    assert_eq!(status, 201);
    assert_eq!(many.as_array().unwrap().len(), 2);

    // Get one; list; wait for the sends and list sent.
    let (status, got) = send(Method::GET, url(&format!("/api/messages/{id}")), None, None).await;
    assert_eq!(status, 200);
    assert_eq!(got["content"], "hello");
    env.wait_drained(Duration::from_secs(30)).await;
    let (status, sent) = send(Method::GET, url("/api/messages/sent?limit=2"), None, None).await;
    assert_eq!(status, 200);
    assert_eq!(sent["total"], 3);
    assert_eq!(sent["messages"].as_array().unwrap().len(), 2);
    let first = &sent["messages"][0];
    for field in [
        "id",
        "phone_number",
        "content",
        "sent",
        "created_at",
        "sent_at",
        "message_id",
        "cached_at",
    ] {
        assert!(
            first.get(field).is_some(),
            "sent list lacks {field}: {first}"
        );
    }
    assert_eq!(first["sent"], true);
    assert!(first["message_id"].is_string());
    let cursor = sent["next_cursor"].as_i64().expect("a second page exists");
    let (_, page2) = send(
        Method::GET,
        url(&format!("/api/messages/sent?limit=2&cursor={cursor}")),
        None,
        None,
    )
    .await;
    assert_eq!(page2["messages"].as_array().unwrap().len(), 1);
    assert!(page2["next_cursor"].is_null());
    let (status, listed) = send(Method::GET, url("/api/messages?status=sent"), None, None).await;
    assert_eq!(status, 200);
    assert_eq!(listed["total"], 3);
    assert!(listed["messages"][0].get("attempts").is_some());
    assert!(listed["messages"][0].get("last_error").is_some());
    let (_, pending) = send(Method::GET, url("/api/messages?status=pending"), None, None).await;
    assert_eq!(pending["total"], 0);

    // Retry: only failed messages.
    assert_error(
        &send(
            Method::POST,
            url(&format!("/api/messages/{id}/retry")),
            None,
            None,
        )
        .await,
        409,
        "conflict",
    );
    env.db()
        .await
        .execute(
            "UPDATE messages SET status = 'failed', last_error = 'test' WHERE id = $1",
            &[&id],
        )
        .await
        .unwrap();
    let (status, retried) = send(
        Method::POST,
        url(&format!("/api/messages/{id}/retry")),
        None,
        None,
    )
    .await;
    assert_eq!(status, 200, "{retried}");
    assert_eq!(retried["status"], "pending");

    // Control and config.
    let (status, state) = send(Method::GET, url("/api/messaging/status"), None, None).await;
    assert_eq!(status, 200);
    assert_eq!(state["running"], true);
    assert_eq!(state["leader"]["replica_id"], "r1");
    assert_eq!(state["this_replica"]["leader"], true);
    assert_eq!(state["batch_size"], 10);
    assert_eq!(state["replicas"][0]["replica_id"], "r1");
    let (status, config) = send(
        Method::PUT,
        url("/api/messaging/config"),
        Some(r#"{"batch_size": 4, "processing_interval": "1m"}"#),
        None,
    )
    .await;
    assert_eq!(status, 200, "{config}");
    assert_eq!(config["batch_size"], 4);
    assert_eq!(config["processing_interval"], "1m");
    let (_, state) = send(Method::GET, url("/api/messaging/status"), None, None).await;
    assert_eq!(state["batch_size"], 4);
    let (_, config) = send(
        Method::PUT,
        url("/api/messaging/config"),
        Some(r#"{"batch_size": null, "processing_interval": null}"#),
        None,
    )
    .await;
    assert_eq!(config["batch_size"], 10, "null clears the override");
    // Cleared too: left at 1m, the retried message could wait a minute for its batch.
    assert_eq!(config["processing_interval"], "200ms");
    assert_eq!(
        send(Method::POST, url("/api/messaging/stop"), None, None)
            .await
            .1["status"],
        "stopped"
    );
    assert_eq!(
        send(Method::POST, url("/api/messaging/start"), None, None)
            .await
            .1["status"],
        "started"
    );

    // Metrics (the retried message was sent a second time) and the OpenAPI document.
    env.wait_drained(Duration::from_secs(30)).await;
    let metrics = http().get(url("/metrics")).send().await.unwrap();
    assert!(
        metrics.headers()["content-type"]
            .to_str()
            .unwrap()
            .starts_with("text/plain")
    );
    // The counter moves right after the row is recorded, so it may trail the drain.
    wait_for("4 sends counted", Duration::from_secs(10), || async {
        let text = http()
            .get(url("/metrics"))
            .send()
            .await
            .ok()?
            .text()
            .await
            .ok()?;
        text.contains(r#"dispatcher_messages_sent_total{lane="default"} 4"#)
            .then_some(())
    })
    .await;
    let (status, doc) = send(Method::GET, url("/openapi.json"), None, None).await;
    assert_eq!(status, 200);
    assert!(doc["openapi"].as_str().unwrap().starts_with("3."));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_requests_get_the_error_shape_with_the_right_status() {
    use reqwest::Method;
    let env = TestEnv::start().await;
    let replica = env.replica("r1", &ReplicaSettings::fast()).await;
    let url = |path: &str| replica.url(path);
    let post = |body: &'static str| send(Method::POST, url("/api/messages"), Some(body), None);

    assert_error(&post("{not json").await, 400, "invalid_json");
    assert_error(&post("").await, 400, "invalid_json");

    let answer = post(r#"{"phone_number": "555111111", "content": "x"}"#).await;
    assert_error(&answer, 422, "validation_failed");
    assert_eq!(answer.1["error"]["field"], "phone_number");
    let long = format!(
        r#"{{"phone_number": "+905551111111", "content": "{}"}}"#,
        "a".repeat(161)
    );
    let answer = send(Method::POST, url("/api/messages"), Some(&long), None).await;
    assert_error(&answer, 422, "validation_failed");
    assert_eq!(answer.1["error"]["field"], "content");
    assert!(
        answer.1["error"]["message"]
            .as_str()
            .unwrap()
            .contains("161")
    );
    let answer = post(r#"[{"phone_number": "+905551111111", "content": "ok"}, {"phone_number": "+905551111111", "content": ""}]"#).await;
    assert_error(&answer, 422, "validation_failed");
    assert_eq!(answer.1["error"]["field"], "content");
    assert_eq!(answer.1["error"]["index"], 1, "names the offending index");
    let answer =
        post(r#"[{"phone_number": "+905551111111", "content": "ok"}, {"content": "no phone"}]"#)
            .await;
    assert_eq!(answer.1["error"]["field"], "phone_number");
    assert_eq!(answer.1["error"]["index"], 1);
    assert_error(
        &post(r#"{"phone_number": 905551111111, "content": "x"}"#).await,
        422,
        "validation_failed",
    );
    let answer = post(r#"{"phone_number": "+905551111111", "content": "a\u0000b"}"#).await;
    assert_error(&answer, 422, "validation_failed");
    assert_eq!(
        answer.1["error"]["field"], "content",
        "NUL is refused before the database sees it"
    );
    assert_error(
        &post(r#"{"phone_number": "+905551111111", "content": "\u3000\n"}"#).await,
        422,
        "validation_failed",
    );
    assert_error(&post("[]").await, 422, "validation_failed");
    assert_error(&post("42").await, 422, "validation_failed");
    let too_many = serde_json::to_string(&vec![
        json!({"phone_number": "+905551111111", "content": "x"});
        1001
    ])
    .unwrap();
    assert_error(
        &send(Method::POST, url("/api/messages"), Some(&too_many), None).await,
        422,
        "validation_failed",
    );
    assert_eq!(
        env.count("pending").await,
        0,
        "nothing was inserted by a rejected request"
    );

    let huge = format!(
        r#"{{"phone_number": "+905551111111", "content": "{}"}}"#,
        "a".repeat(1 << 20)
    );
    assert_error(
        &send(Method::POST, url("/api/messages"), Some(&huge), None).await,
        413,
        "payload_too_large",
    );

    assert_error(
        &send(Method::GET, url("/api/messages/999999"), None, None).await,
        404,
        "not_found",
    );
    assert_error(
        &send(Method::POST, url("/api/messages/999999/retry"), None, None).await,
        404,
        "not_found",
    );
    assert_error(
        &send(Method::GET, url("/api/messages/abc"), None, None).await,
        404,
        "not_found",
    );
    assert_error(
        &send(Method::GET, url("/no/such/route"), None, None).await,
        404,
        "not_found",
    );
    assert_error(
        &send(Method::DELETE, url("/api/messages"), None, None).await,
        405,
        "method_not_allowed",
    );
    assert_error(
        &send(Method::GET, url("/api/messaging/start"), None, None).await,
        405,
        "method_not_allowed",
    );
    let allow = http().delete(url("/api/messages/1")).send().await.unwrap();
    assert_eq!(allow.status(), 405);
    assert_eq!(
        allow.headers()["allow"],
        "GET",
        "405 names the allowed methods"
    );
    let allow = http()
        .get(url("/api/messages/1/retry"))
        .send()
        .await
        .unwrap();
    assert_eq!(allow.headers()["allow"], "POST");
    assert_eq!(
        http()
            .put(url("/api/messages"))
            .send()
            .await
            .unwrap()
            .headers()["allow"],
        "GET, POST"
    );
    assert_error(
        &send(Method::GET, url("/api/messages?limit=0"), None, None).await,
        400,
        "bad_request",
    );
    assert_error(
        &send(Method::GET, url("/api/messages?limit=501"), None, None).await,
        400,
        "bad_request",
    );
    assert_error(
        &send(Method::GET, url("/api/messages?status=lost"), None, None).await,
        400,
        "bad_request",
    );
    assert_error(
        &send(Method::GET, url("/api/messages/sent?cursor=x"), None, None).await,
        400,
        "bad_request",
    );

    let config =
        |body: &'static str| send(Method::PUT, url("/api/messaging/config"), Some(body), None);
    let (status, accepted) = config(r#"{"batch_size": 5.0, "processing_interval": "1m30s"}"#).await;
    assert_eq!(status, 200, "5.0 is the integer 5 in JSON: {accepted}");
    assert_eq!(accepted["batch_size"], 5);
    assert_eq!(accepted["processing_interval"], "1m30s");
    assert_error(
        &config(r#"{"processing_interval": " 2m"}"#).await,
        422,
        "validation_failed",
    );
    assert_error(
        &config(r#"{"batch_size": 0}"#).await,
        422,
        "validation_failed",
    );
    assert_error(
        &config(r#"{"batch_size": "ten"}"#).await,
        422,
        "validation_failed",
    );
    assert_error(
        &config(r#"{"processing_interval": "soon"}"#).await,
        422,
        "validation_failed",
    );
    assert_error(
        &config(r#"{"colour": "blue"}"#).await,
        422,
        "validation_failed",
    );
    assert_error(&config("{}").await, 422, "validation_failed");
    assert_error(&config("{").await, 400, "invalid_json");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn api_token_guards_the_api_but_not_health_or_metrics() {
    use reqwest::Method;
    let env = TestEnv::start().await;
    let replica = env
        .replica("r1", &ReplicaSettings::fast().api_token("s3cret-token"))
        .await;
    let url = |path: &str| replica.url(path);
    assert_error(
        &send(Method::GET, url("/api/messaging/status"), None, None).await,
        401,
        "unauthorized",
    );
    assert_error(
        &send(
            Method::GET,
            url("/api/messaging/status"),
            None,
            Some("wrong"),
        )
        .await,
        401,
        "unauthorized",
    );
    assert_error(
        &send(
            Method::POST,
            url("/api/messaging/stop"),
            None,
            Some("s3cret-tokenX"),
        )
        .await,
        401,
        "unauthorized",
    );
    assert_eq!(
        send(
            Method::GET,
            url("/api/messaging/status"),
            None,
            Some("s3cret-token")
        )
        .await
        .0,
        200
    );
    let (status, _) = send(
        Method::POST,
        url("/api/messages"),
        Some(r#"{"phone_number": "+905551111111", "content": "x"}"#),
        Some("s3cret-token"),
    )
    .await;
    assert_eq!(status, 201);
    // The scheme name is case-insensitive (RFC 7235); the token is not.
    for header in [
        "bearer s3cret-token",
        "BEARER s3cret-token",
        "Bearer  s3cret-token",
    ] {
        let status = http()
            .get(url("/api/messaging/status"))
            .header("authorization", header)
            .send()
            .await
            .unwrap()
            .status();
        assert_eq!(status, 200, "{header:?}");
    }
    let status = http()
        .get(url("/api/messaging/status"))
        .header("authorization", "Bearer S3CRET-TOKEN")
        .send()
        .await
        .unwrap()
        .status();
    assert_eq!(status, 401);
    for open in [
        "/health",
        "/health/live",
        "/health/ready",
        "/metrics",
        "/version",
        "/openapi.json",
    ] {
        let status = http().get(url(open)).send().await.unwrap().status();
        assert_eq!(status, 200, "{open} stays open");
    }
    assert!(
        !replica.logs().contains("s3cret-token"),
        "the token never reaches the log"
    );
}

/// Each operation in `/openapi.json` is served (no 404/405 for a documented route).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_openapi_document_matches_the_routes() {
    let env = TestEnv::start().await;
    let replica = env.replica("r1", &ReplicaSettings::fast()).await;
    let ids = env.create_messages(&replica, &["x"]).await;
    // A dead-letter webhook, for the replay route to find.
    let event: i64 = env
        .db()
        .await
        .query_one(
            "INSERT INTO webhook_events (webhook_id, message_id, type, payload, status)
             VALUES ('msg_route', $1, 'message.sent', '{}', 'failed') RETURNING id",
            &[&ids[0]],
        )
        .await
        .unwrap()
        .get(0);
    let (_, doc) = replica.get("/openapi.json").await;
    let paths = doc["paths"].as_object().unwrap();
    assert!(paths.len() >= 14, "{} paths documented", paths.len());
    for (path, operations) in paths {
        for method in operations.as_object().unwrap().keys() {
            let id = if path.starts_with("/api/webhooks/") {
                event
            } else {
                ids[0]
            };
            let concrete = path
                .replace("{id}", &id.to_string())
                .replace("{name}", "default");
            let method = reqwest::Method::from_bytes(method.to_uppercase().as_bytes()).unwrap();
            let body = if method == reqwest::Method::PUT {
                Some(r#"{"batch_size": 3}"#)
            } else {
                None
            };
            let (status, answer) = send(method.clone(), replica.url(&concrete), body, None).await;
            assert!(
                status != 404 && status != 405,
                "{method} {path} is documented but answered {status}: {answer}"
            );
        }
    }
    wait_for(
        "the replica to stay healthy",
        Duration::from_secs(5),
        || async { (replica.get("/health/live").await.0 == 200).then_some(()) },
    )
    .await;
}

/// A client that hangs up before its answer comes (a probe or client timing out) is
/// routine, not a server error: the replica keeps serving and writes no ERROR line.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_hanging_up_before_its_answer_is_not_logged_as_an_error() {
    use tokio::io::AsyncWriteExt;
    let env = TestEnv::start().await;
    let replica = env.replica("r1", &ReplicaSettings::fast()).await;
    let address = replica.url("").trim_start_matches("http://").to_string();

    // Hold the messages table so that listing it waits, then ask for it and hang up.
    let mut db = env.db().await;
    let lock = db.transaction().await.unwrap();
    lock.batch_execute("LOCK TABLE messages IN ACCESS EXCLUSIVE MODE")
        .await
        .unwrap();
    for request in [
        &b"GET /api/messages HTTP/1.1\r\nHost: x\r\n\r\n"[..],
        &b"GET /health HTTP/1.1\r\nHost: x\r\n"[..], // the head never completes
    ] {
        let mut stream = tokio::net::TcpStream::connect(&address).await.unwrap();
        stream.write_all(request).await.unwrap();
        tokio::time::sleep(Duration::from_millis(300)).await;
        drop(stream);
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    lock.rollback().await.unwrap();

    let (status, _) = send(
        reqwest::Method::GET,
        replica.url("/api/messages"),
        None,
        None,
    )
    .await;
    assert_eq!(status, 200, "the replica still serves");
    let logs = replica.logs();
    let errors: Vec<&str> = logs
        .lines()
        .filter(|line| line.contains("\"level\":\"ERROR\""))
        .collect();
    assert!(errors.is_empty(), "ERROR lines: {errors:#?}");
}

/// Opens a connection to `port` and sends an unfinished request: headers without
/// their final empty line, as a slowloris client does. `None` when the connection is
/// not made within `patience` (a server that stopped accepting leaves connects waiting
/// in its backlog).
async fn unfinished_request(port: u16, patience: Duration) -> Option<tokio::net::TcpStream> {
    use tokio::io::AsyncWriteExt;
    let connect = tokio::net::TcpStream::connect(("127.0.0.1", port));
    let mut stream = tokio::time::timeout(patience, connect).await.ok()?.ok()?;
    stream
        .write_all(b"GET /health/live HTTP/1.1\r\nHost: slow\r\nX-Slow: ")
        .await
        .ok()?;
    Some(stream)
}

/// Whether the server has closed `stream` (a read returns end of file or an error).
async fn closed_by_server(stream: &mut tokio::net::TcpStream) -> bool {
    use tokio::io::AsyncReadExt;
    let mut buffer = [0u8; 1024];
    loop {
        match tokio::time::timeout(Duration::from_millis(10), stream.read(&mut buffer)).await {
            Err(_) => return false,
            Ok(Ok(0) | Err(_)) => return true,
            // A 408 before the close: read on.
            Ok(Ok(_)) => {}
        }
    }
}

/// A request whose headers never finish is not held forever: the server closes it
/// after its header-read timeout (10 s), so such connections cannot pile up.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unfinished_requests_are_closed_after_the_header_timeout() {
    let env = TestEnv::start().await;
    let replica = env.replica("r1", &ReplicaSettings::fast()).await;
    let mut slow = Vec::new();
    for _ in 0..300 {
        // Generous: on a busy machine a full accept queue drops a SYN, and the
        // client sends it again a second later.
        let stream = unfinished_request(replica.port(), Duration::from_secs(30)).await;
        slow.push(stream.expect("connected within 30 s"));
    }
    // Each stream is checked until the server has closed it (40 s at most: the
    // timeout is 10 s).
    let deadline = std::time::Instant::now() + Duration::from_secs(40);
    for (i, stream) in slow.iter_mut().enumerate() {
        while !closed_by_server(stream).await {
            assert!(
                std::time::Instant::now() < deadline,
                "unfinished request {i} still open after 40 s"
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
    assert_eq!(replica.get("/health/live").await.0, 200);
}

/// 1,500 unfinished requests against a replica that may open 1,024 files (a tight
/// container): without a cap they took every descriptor and the replica stopped
/// accepting, health checks included. Now the oldest idle connection makes room for
/// each new one, so health and the API keep answering, and the replica's descriptors
/// stay bounded.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_flood_of_unfinished_requests_leaves_health_and_the_api_answering() {
    raise_own_open_files_limit();
    let env = TestEnv::start().await;
    let replica = crate::support::Replica::spawn_with_open_files(
        "r1",
        env.dir.path(),
        env.settings().to_env(),
        1024,
    );
    replica.wait_ready().await;
    let mut slow = Vec::new();
    for _ in 0..1500 {
        if let Some(stream) = unfinished_request(replica.port(), Duration::from_secs(1)).await {
            slow.push(stream);
        }
    }
    for round in 0..5 {
        let started = std::time::Instant::now();
        let live = http()
            .get(replica.url("/health/live"))
            .timeout(Duration::from_secs(5))
            .send()
            .await
            .unwrap_or_else(|err| panic!("round {round}: /health/live did not answer: {err}"));
        assert_eq!(live.status(), 200);
        let stats = http()
            .get(replica.url("/api/messages/stats"))
            .timeout(Duration::from_secs(5))
            .send()
            .await
            .unwrap_or_else(|err| panic!("round {round}: the API did not answer: {err}"));
        assert_eq!(stats.status(), 200);
        println!("round {round}: answered in {:?}", started.elapsed());
        // More unfinished requests between the rounds.
        for _ in 0..200 {
            if let Some(stream) = unfinished_request(replica.port(), Duration::from_secs(1)).await {
                slow.push(stream);
            }
        }
    }
    let descriptors = std::fs::read_dir(format!("/proc/{}/fd", replica.pid()))
        .unwrap()
        .count();
    assert!(
        descriptors < 1024 - 100,
        "{descriptors} open descriptors with a limit of 1,024"
    );
    drop(slow);
}

/// The test opens more sockets than a default soft limit allows.
fn raise_own_open_files_limit() {
    let mut limit = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit/setrlimit on this process with a valid struct.
    unsafe {
        libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit);
        limit.rlim_cur = limit.rlim_max;
        libc::setrlimit(libc::RLIMIT_NOFILE, &limit);
    }
}
