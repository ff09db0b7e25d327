//! What each provider kind's API expects and answers (docs/design.md#provider-kinds):
//! how a message becomes a request, and how an answer becomes accepted / throttled /
//! retry / rejected with the provider's message id. Pure functions, so each mapping is
//! tested without a server; the exchange itself is in `client`.

use std::time::Duration;

use reqwest::StatusCode;
use reqwest::header::{HeaderMap, HeaderValue, RETRY_AFTER};
use serde_json::{Value, json};

use super::client::{MAX_PROVIDER_ID, clean_text};
use super::{Outgoing, SendOutcome};
use crate::config::{ProviderKind, ProviderSpec};
use crate::encoding::{Encoding, segment};

/// Twilio's error code for "too many requests" (its 429 carries it).
const TWILIO_THROTTLED: i64 = 20429;

/// A request ready to go: where, with what body.
#[derive(Debug, Clone, PartialEq)]
pub struct Request {
    pub url: String,
    pub body: Body,
}

#[derive(Debug, Clone, PartialEq)]
pub enum Body {
    Json(Value),
    /// `application/x-www-form-urlencoded`, in this order.
    Form(Vec<(&'static str, String)>),
}

/// Where a provider posts its delivery receipts to this deployment, when its
/// `public_url` is known. Vonage and Infobip cannot add a header to their callbacks, so
/// theirs carries `receipts_token` (`DLR_TOKEN`, else `API_TOKEN`) as `?token=`;
/// Twilio's is signed instead.
pub fn receipts_url(spec: &ProviderSpec, receipts_token: Option<&str>) -> Option<String> {
    let base = spec.public_url.as_ref()?;
    let url = format!("{base}/api/providers/{}/receipts", spec.name);
    Some(match (spec.kind, receipts_token) {
        (ProviderKind::Vonage | ProviderKind::Infobip, Some(token)) => {
            let token: String = form_urlencoded::byte_serialize(token.as_bytes()).collect();
            format!("{url}?token={token}")
        }
        _ => url,
    })
}

/// The request that sends `message` through the provider `spec` describes. `secret` is
/// the token (`token_env`): Vonage carries it in the body, the others in a header the
/// client adds. `callback`: where its receipt should go ([`receipts_url`]).
pub fn request(
    spec: &ProviderSpec,
    message: &Outgoing<'_>,
    secret: &str,
    callback: Option<&str>,
) -> Request {
    let base = spec.settings.url.as_str();
    let from = message.from;
    match spec.kind {
        ProviderKind::HttpJson => {
            let mut body = json!({ "to": message.to, "content": message.content });
            if let Some(from) = from {
                body["from"] = from.into();
            }
            Request {
                url: base.to_string(),
                body: Body::Json(body),
            }
        }
        ProviderKind::Twilio => {
            let account = spec.account_sid.as_deref().unwrap_or_default();
            let mut form = vec![("To", message.to.to_string())];
            // A message's own sender wins over the Messaging Service, which picks one.
            match (from, &spec.messaging_service_sid) {
                (Some(from), _) => form.push(("From", from.to_string())),
                (None, Some(service)) => form.push(("MessagingServiceSid", service.clone())),
                (None, None) => {}
            }
            form.push(("Body", message.content.to_string()));
            if let Some(callback) = callback {
                form.push(("StatusCallback", callback.to_string()));
            }
            Request {
                url: format!("{base}/2010-04-01/Accounts/{account}/Messages.json"),
                body: Body::Form(form),
            }
        }
        ProviderKind::Vonage => {
            let mut form = vec![
                ("api_key", spec.api_key.clone().unwrap_or_default()),
                ("api_secret", secret.to_string()),
                ("from", from.unwrap_or_default().to_string()),
                ("to", digits(message.to)),
                ("text", message.content.to_string()),
            ];
            if segment(message.content).encoding == Encoding::Ucs2 {
                form.push(("type", "unicode".into()));
            }
            // Echoed in its receipts; the delivery key is at most 64 characters, within
            // Vonage's 100.
            form.push(("client-ref", message.delivery_key.to_string()));
            if let Some(callback) = callback {
                form.push(("callback", callback.to_string()));
            }
            Request {
                url: format!("{base}/sms/json"),
                body: Body::Form(form),
            }
        }
        ProviderKind::Infobip => {
            let mut one = json!({
                "destinations": [{ "to": digits(message.to) }],
                "text": message.content,
            });
            if let Some(from) = from {
                one["from"] = from.into();
            }
            if let Some(callback) = callback {
                one["notifyUrl"] = callback.into();
                one["notifyContentType"] = "application/json".into();
            }
            Request {
                url: format!("{base}/sms/2/text/advanced"),
                body: Body::Json(json!({ "messages": [one] })),
            }
        }
    }
}

/// The number without its `+`: how Vonage and Infobip write international numbers.
fn digits(e164: &str) -> String {
    e164.trim_start_matches('+').to_string()
}

/// What an answer of the provider `kind` means for the message.
pub fn classify(
    kind: ProviderKind,
    status: StatusCode,
    headers: &HeaderMap,
    body: &[u8],
) -> SendOutcome {
    match kind {
        ProviderKind::HttpJson => {
            classify_http(status, headers, body, &["messageId", "message_id", "id"])
        }
        ProviderKind::Twilio => classify_twilio(status, headers, body),
        ProviderKind::Vonage => classify_vonage(status, headers, body),
        ProviderKind::Infobip => classify_infobip(status, headers, body),
    }
}

/// The classification every kind shares for what HTTP alone says
/// (docs/design.md#provider-answers): 2xx accepted with the id at one of `id_keys`;
/// 429, or 503 with `Retry-After`, throttled; 3xx, 408, 425 and 5xx retried (502 and
/// 504 with an unknown outcome); 401 and 403 refused credentials; any other 4xx
/// rejected for good.
///
/// 3xx: redirects are not followed (a POST must not turn into a GET elsewhere), so a
/// redirect means the provider did not take the message; it is usually a wrong URL,
/// which the operator can fix, so it is retried like a 5xx and `MAX_ATTEMPTS` bounds it.
pub fn classify_http(
    status: StatusCode,
    headers: &HeaderMap,
    body: &[u8],
    id_keys: &[&str],
) -> SendOutcome {
    if status.is_success() {
        let value: Value = serde_json::from_slice(body).unwrap_or(Value::Null);
        return SendOutcome::Accepted {
            provider_message_id: id_keys.iter().find_map(|key| message_id(value.get(key))),
        };
    }
    if status.is_redirection() {
        let location = headers
            .get(reqwest::header::LOCATION)
            .map(|v| clean_text(&String::from_utf8_lossy(v.as_bytes())))
            .unwrap_or_else(|| "(no Location)".into());
        return SendOutcome::Transient {
            error: clean_text(&format!(
                "HTTP {}: redirect to {location} not followed; check the provider's URL",
                status.as_u16()
            )),
            unknown: false,
        };
    }
    let error = format!("HTTP {}: {}", status.as_u16(), body_excerpt(body));
    // A Retry-After counts only where it means "slow down": on a 429 or a 503. On a
    // 400 or a 401 it would turn a refusal into an endless throttle.
    let retry_after = headers.get(RETRY_AFTER).and_then(parse_retry_after);
    let throttles = status == StatusCode::TOO_MANY_REQUESTS
        || (status == StatusCode::SERVICE_UNAVAILABLE && retry_after.is_some());
    if throttles {
        return SendOutcome::Throttled { error, retry_after };
    }
    if matches!(status.as_u16(), 408 | 425) || status.is_server_error() {
        SendOutcome::Transient {
            error,
            // A gateway that gave up on the provider behind it (502, 504) cannot say
            // whether the provider took the message.
            unknown: matches!(status.as_u16(), 502 | 504),
        }
    } else if matches!(status.as_u16(), 401 | 403) {
        SendOutcome::Unauthorized { error }
    } else {
        SendOutcome::Rejected { error }
    }
}

/// Twilio: 201 with the message resource (`sid`); errors carry `code` (20429: too many
/// requests, whatever the HTTP status).
fn classify_twilio(status: StatusCode, headers: &HeaderMap, body: &[u8]) -> SendOutcome {
    // Only an error's body is read here; an accepted one is read once, for its `sid`.
    let code = || {
        serde_json::from_slice::<Value>(body)
            .ok()?
            .get("code")?
            .as_i64()
    };
    if !status.is_success() && code() == Some(TWILIO_THROTTLED) {
        return SendOutcome::Throttled {
            error: format!("HTTP {}: {}", status.as_u16(), body_excerpt(body)),
            retry_after: headers.get(RETRY_AFTER).and_then(parse_retry_after),
        };
    }
    classify_http(status, headers, body, &["sid"])
}

/// Vonage answers 200 whatever became of the message: the verdict is the message's
/// `status` code (docs/design.md#provider-kinds has the table).
fn classify_vonage(status: StatusCode, headers: &HeaderMap, body: &[u8]) -> SendOutcome {
    if !status.is_success() {
        return classify_http(status, headers, body, &[]);
    }
    let value: Value = serde_json::from_slice(body).unwrap_or(Value::Null);
    let parts = value
        .get("messages")
        .and_then(Value::as_array)
        .filter(|parts| !parts.is_empty());
    let Some(parts) = parts else {
        // 200 without a verdict: whether it was taken is not known.
        return SendOutcome::Transient {
            error: format!("HTTP 200 without messages[]: {}", body_excerpt(body)),
            unknown: true,
        };
    };
    let code = |part: &Value| match part.get("status") {
        Some(Value::String(text)) => text.parse::<i64>().ok(),
        Some(Value::Number(n)) => n.as_i64(),
        _ => None,
    };
    // A long text is sent as several parts, each with its own status: once one part is
    // out, sending the message again would repeat it.
    if let Some(sent) = parts.iter().find(|part| code(part) == Some(0)) {
        return SendOutcome::Accepted {
            provider_message_id: message_id(sent.get("message-id")),
        };
    }
    let first = &parts[0];
    let text = first
        .get("error-text")
        .and_then(Value::as_str)
        .unwrap_or("");
    let error = clean_text(&format!(
        "Vonage status {}: {text}",
        code(first).map_or("?".into(), |c| c.to_string())
    ));
    match code(first) {
        // Throttled; too many existing binds.
        Some(1 | 10) => SendOutcome::Throttled {
            error,
            retry_after: None,
        },
        // Internal error; partner quota exceeded (out of credit: retried until topped up).
        Some(5 | 9) => SendOutcome::Transient {
            error,
            unknown: false,
        },
        // Invalid credentials; account barred; invalid signature.
        Some(4 | 8 | 14) => SendOutcome::Unauthorized { error },
        // No status at all: not a verdict.
        None => SendOutcome::Transient {
            error,
            unknown: true,
        },
        Some(_) => SendOutcome::Rejected { error },
    }
}

/// Infobip: 200 with `messages[].messageId` and a `status.groupName` (PENDING,
/// ACCEPTED, DELIVERED: taken; REJECTED, UNDELIVERABLE, EXPIRED: refused for good).
fn classify_infobip(status: StatusCode, headers: &HeaderMap, body: &[u8]) -> SendOutcome {
    if !status.is_success() {
        return classify_http(status, headers, body, &[]);
    }
    let value: Value = serde_json::from_slice(body).unwrap_or(Value::Null);
    let Some(first) = value.get("messages").and_then(|m| m.get(0)) else {
        return SendOutcome::Transient {
            error: format!(
                "HTTP {} without messages[]: {}",
                status.as_u16(),
                body_excerpt(body)
            ),
            unknown: true,
        };
    };
    let group = first
        .pointer("/status/groupName")
        .and_then(Value::as_str)
        .unwrap_or("PENDING");
    match group {
        "REJECTED" | "UNDELIVERABLE" | "EXPIRED" => {
            let name = first
                .pointer("/status/name")
                .and_then(Value::as_str)
                .unwrap_or("");
            let description = first
                .pointer("/status/description")
                .and_then(Value::as_str)
                .unwrap_or("");
            SendOutcome::Rejected {
                error: clean_text(&format!("Infobip {group} {name}: {description}")),
            }
        }
        _ => SendOutcome::Accepted {
            provider_message_id: message_id(first.get("messageId")),
        },
    }
}

/// The provider's id for the message, cleaned; `None` when absent, empty after
/// cleaning, or longer than [`MAX_PROVIDER_ID`] (logged by the caller as missing).
fn message_id(value: Option<&Value>) -> Option<String> {
    let raw = match value? {
        Value::String(s) => s.clone(),
        Value::Number(n) => n.to_string(),
        _ => return None,
    };
    let id: String = raw.chars().filter(|c| !c.is_control()).collect();
    let id = id.trim();
    (!id.is_empty() && id.len() <= MAX_PROVIDER_ID).then(|| id.to_string())
}

/// `Retry-After` as seconds or an HTTP date. Any value parses to some duration; the
/// throttle caps it (`Routing`).
fn parse_retry_after(value: &HeaderValue) -> Option<Duration> {
    let text = value.to_str().ok()?.trim();
    if !text.is_empty() && text.bytes().all(|b| b.is_ascii_digit()) {
        // Saturates instead of failing on absurd values such as 99999999999999999999.
        let secs = text.parse::<u64>().unwrap_or(u64::MAX);
        return Some(Duration::from_secs(secs));
    }
    let when = chrono::DateTime::parse_from_rfc2822(text).ok()?;
    let wait = when.signed_duration_since(chrono::Utc::now());
    Some(wait.to_std().unwrap_or(Duration::ZERO))
}

/// The first 200 characters of a body, for `last_error`.
fn body_excerpt(body: &[u8]) -> String {
    let text = clean_text(&String::from_utf8_lossy(body));
    let trimmed = text.trim();
    match trimmed.char_indices().nth(200) {
        Some((cut, _)) => format!("{}…", &trimmed[..cut]),
        None if trimmed.is_empty() => "(empty body)".into(),
        None => trimmed.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::{BreakerSettings, ProviderConfig, Secret};
    use crate::provider::MAX_ERROR_CHARS;

    fn answer(
        kind: ProviderKind,
        status: u16,
        retry_after: Option<&str>,
        body: &str,
    ) -> SendOutcome {
        let mut headers = HeaderMap::new();
        if let Some(value) = retry_after {
            headers.insert(RETRY_AFTER, HeaderValue::from_str(value).unwrap());
        }
        classify(
            kind,
            StatusCode::from_u16(status).unwrap(),
            &headers,
            body.as_bytes(),
        )
    }

    fn http(status: u16, retry_after: Option<&str>, body: &str) -> SendOutcome {
        answer(ProviderKind::HttpJson, status, retry_after, body)
    }

    fn accepted(id: &str) -> SendOutcome {
        SendOutcome::Accepted {
            provider_message_id: Some(id.into()),
        }
    }

    fn spec(kind: ProviderKind) -> ProviderSpec {
        ProviderSpec {
            name: "p".into(),
            kind,
            settings: ProviderConfig {
                url: kind
                    .default_base_url()
                    .unwrap_or("http://sms.example/send")
                    .to_string(),
                token: Secret::new("secret".to_string()),
                auth_header: None,
                timeout: Duration::from_secs(5),
                ca_cert: None,
                insecure_skip_verify: false,
            },
            account_sid: Some("AC123".into()),
            messaging_service_sid: None,
            api_key: Some("key".into()),
            from: None,
            public_url: None,
            breaker: BreakerSettings::default(),
            prices: None,
        }
    }

    const MESSAGE: Outgoing<'static> = Outgoing {
        delivery_key: "k-1",
        to: "+905551111111",
        content: "Hello",
        from: Some("ACME"),
    };

    #[test]
    fn every_2xx_is_accepted_with_its_id() {
        assert_eq!(
            http(202, None, r#"{"message":"Accepted","messageId":"a1"}"#),
            accepted("a1")
        );
        assert_eq!(http(200, None, r#"{"message_id":"b2"}"#), accepted("b2"));
        assert_eq!(http(201, None, r#"{"id":42}"#), accepted("42"));
        assert_eq!(
            http(200, None, "ok"),
            SendOutcome::Accepted {
                provider_message_id: None
            }
        );
    }

    #[test]
    fn server_errors_are_retried_and_throttles_carry_their_wait() {
        for status in [408, 425, 500, 502, 503, 504] {
            assert_eq!(
                http(status, None, "x"),
                SendOutcome::Transient {
                    error: format!("HTTP {status}: x"),
                    unknown: matches!(status, 502 | 504),
                },
            );
        }
        // A Retry-After where it does not mean "slow down" changes nothing.
        assert!(matches!(
            http(400, Some("5"), "bad"),
            SendOutcome::Rejected { .. }
        ));
        assert!(matches!(
            http(401, Some("5"), "no"),
            SendOutcome::Unauthorized { .. }
        ));
        match http(429, Some("120"), "slow down") {
            SendOutcome::Throttled { retry_after, error } => {
                assert_eq!(retry_after, Some(Duration::from_secs(120)));
                assert!(error.contains("429") && error.contains("slow down"));
            }
            other => panic!("{other:?}"),
        }
        assert!(matches!(
            http(429, None, ""),
            SendOutcome::Throttled {
                retry_after: None,
                ..
            }
        ));
        // A Retry-After on a 503 is a throttle too.
        let date = (chrono::Utc::now() + chrono::Duration::seconds(60)).to_rfc2822();
        match http(503, Some(&date), "") {
            SendOutcome::Throttled {
                retry_after: Some(wait),
                ..
            } => assert!(wait > Duration::from_secs(50) && wait <= Duration::from_secs(60)),
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn provider_values_are_cleaned_and_bounded_before_they_reach_sql() {
        assert_eq!(
            http(202, None, "{\"messageId\": \"ab\\u0000c\"}"),
            accepted("abc")
        );
        let long = format!("{{\"messageId\": \"{}\"}}", "x".repeat(MAX_PROVIDER_ID + 1));
        assert_eq!(
            http(202, None, &long),
            SendOutcome::Accepted {
                provider_message_id: None
            }
        );
        match http(503, Some("99999999999999999999"), "bad\0body") {
            SendOutcome::Throttled { error, retry_after } => {
                assert!(!error.contains('\0'), "{error:?}");
                assert_eq!(retry_after, Some(Duration::from_secs(u64::MAX)));
            }
            other => panic!("{other:?}"),
        }
        let huge = "e".repeat(10_000);
        match http(400, None, &huge) {
            SendOutcome::Rejected { error } => assert!(error.chars().count() <= 220),
            other => panic!("{other:?}"),
        }
        assert!(clean_text(&"é".repeat(2 * MAX_ERROR_CHARS)).chars().count() <= MAX_ERROR_CHARS);
    }

    #[test]
    fn a_redirect_is_retried_and_names_its_target() {
        let mut headers = HeaderMap::new();
        headers.insert(
            reqwest::header::LOCATION,
            HeaderValue::from_static("https://elsewhere.example/send"),
        );
        match classify(ProviderKind::Twilio, StatusCode::FOUND, &headers, b"") {
            SendOutcome::Transient { error, unknown } => {
                assert!(!unknown);
                assert!(
                    error.contains("302") && error.contains("elsewhere.example"),
                    "{error}"
                );
            }
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn other_client_errors_are_final() {
        for status in [400, 404, 409, 422] {
            assert!(
                matches!(http(status, None, "bad"), SendOutcome::Rejected { .. }),
                "{status}"
            );
        }
        for status in [401, 403] {
            assert!(
                matches!(http(status, None, "bad"), SendOutcome::Unauthorized { .. }),
                "{status}"
            );
        }
    }

    #[test]
    fn http_json_posts_to_from_and_content() {
        let request = request(&spec(ProviderKind::HttpJson), &MESSAGE, "secret", None);
        assert_eq!(request.url, "http://sms.example/send");
        assert_eq!(
            request.body,
            Body::Json(json!({"to": "+905551111111", "content": "Hello", "from": "ACME"}))
        );
        let without = Outgoing {
            from: None,
            ..MESSAGE
        };
        let request = super::request(&spec(ProviderKind::HttpJson), &without, "secret", None);
        assert_eq!(
            request.body,
            Body::Json(json!({"to": "+905551111111", "content": "Hello"}))
        );
    }

    #[test]
    fn twilio_gets_a_form_and_answers_with_a_sid() {
        let mut twilio = spec(ProviderKind::Twilio);
        twilio.public_url = Some("https://dispatch.example".into());
        let callback = receipts_url(&twilio, Some("dlr token"));
        let request = request(&twilio, &MESSAGE, "secret", callback.as_deref());
        assert_eq!(
            request.url,
            "https://api.twilio.com/2010-04-01/Accounts/AC123/Messages.json"
        );
        assert_eq!(
            request.body,
            Body::Form(vec![
                ("To", "+905551111111".into()),
                ("From", "ACME".into()),
                ("Body", "Hello".into()),
                (
                    "StatusCallback",
                    "https://dispatch.example/api/providers/p/receipts".into()
                ),
            ])
        );
        twilio.messaging_service_sid = Some("MG9".into());
        let without = Outgoing {
            from: None,
            ..MESSAGE
        };
        let Body::Form(form) = super::request(&twilio, &without, "secret", None).body else {
            panic!("a form")
        };
        assert_eq!(form[1], ("MessagingServiceSid", "MG9".to_string()));

        let twilio = ProviderKind::Twilio;
        assert_eq!(
            answer(twilio, 201, None, r#"{"sid":"SM1","status":"queued"}"#),
            accepted("SM1")
        );
        assert!(matches!(
            answer(
                twilio,
                429,
                None,
                r#"{"code":20429,"message":"Too Many Requests"}"#
            ),
            SendOutcome::Throttled { .. }
        ));
        // 20429 decides, whatever the status it comes with.
        assert!(matches!(
            answer(
                twilio,
                400,
                None,
                r#"{"code":20429,"message":"Too Many Requests"}"#
            ),
            SendOutcome::Throttled { .. }
        ));
        assert!(matches!(
            answer(
                twilio,
                400,
                None,
                r#"{"code":21211,"message":"Invalid 'To' Phone Number"}"#
            ),
            SendOutcome::Rejected { .. }
        ));
        assert!(matches!(
            answer(
                twilio,
                401,
                None,
                r#"{"code":20003,"message":"Authenticate"}"#
            ),
            SendOutcome::Unauthorized { .. }
        ));
    }

    #[test]
    fn vonage_gets_its_secret_in_the_form_and_unicode_marked() {
        let vonage = spec(ProviderKind::Vonage);
        let request = request(&vonage, &MESSAGE, "secret", None);
        assert_eq!(request.url, "https://rest.nexmo.com/sms/json");
        assert_eq!(
            request.body,
            Body::Form(vec![
                ("api_key", "key".into()),
                ("api_secret", "secret".into()),
                ("from", "ACME".into()),
                ("to", "905551111111".into()),
                ("text", "Hello".into()),
                ("client-ref", "k-1".into()),
            ])
        );
        let turkish = Outgoing {
            content: "Günaydın",
            ..MESSAGE
        };
        let Body::Form(form) = super::request(&vonage, &turkish, "secret", None).body else {
            panic!("a form")
        };
        assert!(form.contains(&("type", "unicode".to_string())), "{form:?}");

        let vonage = ProviderKind::Vonage;
        let verdict = |status: &str| {
            answer(
                vonage,
                200,
                None,
                &format!(
                    r#"{{"message-count":"1","messages":[{{"to":"905551111111","message-id":"0A1","status":"{status}","error-text":"why"}}]}}"#
                ),
            )
        };
        assert_eq!(verdict("0"), accepted("0A1"));
        assert!(matches!(
            verdict("1"),
            SendOutcome::Throttled {
                retry_after: None,
                ..
            }
        ));
        assert!(matches!(
            verdict("5"),
            SendOutcome::Transient { unknown: false, .. }
        ));
        assert!(matches!(verdict("4"), SendOutcome::Unauthorized { .. }));
        match verdict("3") {
            SendOutcome::Rejected { error } => assert_eq!(error, "Vonage status 3: why"),
            other => panic!("{other:?}"),
        }
        assert!(matches!(
            answer(vonage, 200, None, "{}"),
            SendOutcome::Transient { unknown: true, .. }
        ));
        // Two parts, the second throttled after the first went out: accepted.
        assert_eq!(
            answer(
                vonage,
                200,
                None,
                r#"{"message-count":"2","messages":[{"status":"0","message-id":"P1"},{"status":"1"}]}"#
            ),
            accepted("P1")
        );
    }

    #[test]
    fn infobip_gets_json_and_answers_with_a_status_group() {
        let mut infobip = spec(ProviderKind::Infobip);
        infobip.public_url = Some("https://dispatch.example".into());
        let callback = receipts_url(&infobip, Some("dlr token"));
        let request = request(&infobip, &MESSAGE, "secret", callback.as_deref());
        assert_eq!(request.url, "https://api.infobip.com/sms/2/text/advanced");
        assert_eq!(
            request.body,
            Body::Json(json!({"messages": [{
                "destinations": [{"to": "905551111111"}],
                "from": "ACME",
                "text": "Hello",
                "notifyUrl": "https://dispatch.example/api/providers/p/receipts?token=dlr+token",
                "notifyContentType": "application/json",
            }]}))
        );
        let infobip = ProviderKind::Infobip;
        let group = |name: &str| {
            answer(
                infobip,
                200,
                None,
                &format!(
                    r#"{{"bulkId":"b","messages":[{{"to":"905551111111","messageId":"ib-1","status":{{"groupId":1,"groupName":"{name}","id":26,"name":"X","description":"d"}}}}]}}"#
                ),
            )
        };
        assert_eq!(group("PENDING"), accepted("ib-1"));
        assert!(matches!(group("REJECTED"), SendOutcome::Rejected { .. }));
        assert!(matches!(
            answer(
                infobip,
                401,
                None,
                r#"{"requestError":{"serviceException":{"messageId":"UNAUTHORIZED"}}}"#
            ),
            SendOutcome::Unauthorized { .. }
        ));
        assert!(matches!(
            answer(infobip, 429, Some("3"), ""),
            SendOutcome::Throttled { .. }
        ));
    }
}
