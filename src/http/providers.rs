//! A provider's callbacks: `POST /api/providers/{name}/receipts`, delivery receipts in
//! each provider's own format (docs/operations.md#providers), mapped onto ours
//! (`delivered`, `undelivered`, `failed`) and recorded as `POST /api/delivery-receipts`
//! records them; and `POST /api/providers/{name}/inbound`, the recipients' replies
//! (`super::inbound`).
//!
//! Authentication, the same for both, per kind:
//! - `twilio`: the `X-Twilio-Signature` header, HMAC-SHA1 with the account's auth token
//!   over the URL Twilio called and the form's parameters sorted by name, base64. The
//!   URL is the provider's `public_url` plus the path when set (behind a proxy the
//!   address this replica sees is not the one Twilio called), else the `Host` it was
//!   called on. A missing or wrong signature gets 403 and changes nothing.
//! - the others: `DLR_TOKEN` as a Bearer token or as the `token` query parameter (the
//!   form their callback URLs can carry), else `API_TOKEN`, else open, like
//!   `/api/delivery-receipts`.

use base64::Engine;
use bytes::Bytes;
use serde_json::{Value, json};
use warp::Filter;
use warp::filters::BoxedFilter;
use warp::http::{HeaderMap, StatusCode};
use warp::reply::Response;

use super::{ApiError, State, body, json, respond, with_state};
use crate::config::{ProviderKind, ProviderSpec};
use crate::domain::DeliveryStatus;
use crate::store::receipts::Receipt;

/// Longest provider id or error code kept.
const MAX_TEXT: usize = 255;

pub fn routes(state: State) -> BoxedFilter<(Response,)> {
    let receipts = callback("receipts", state.clone()).then(
        |name: String, request: Callback, state: State| async move {
            respond(receive(state, name, request)).await
        },
    );
    let inbound = callback("inbound", state).then(
        |name: String, request: Callback, state: State| async move {
            respond(super::inbound::receive(state, name, request)).await
        },
    );
    receipts.or(inbound).unify().boxed()
}

/// `POST` (a body) or `GET` (Vonage's callbacks, when its account sends them that way;
/// the query string only) at `/providers/{name}/{endpoint}`.
fn callback(
    endpoint: &'static str,
    state: State,
) -> impl Filter<Extract = (String, Callback, State), Error = warp::Rejection> + Clone {
    let post = warp::post()
        .and(body::any_bytes())
        .map(|body: Bytes| (false, body));
    let get = warp::get().map(|| (true, Bytes::new()));
    warp::path("providers")
        .and(warp::path::param::<String>())
        .and(warp::path(endpoint))
        .and(warp::path::end())
        .and(post.or(get).unify())
        .and(warp::path::full())
        .and(warp::query::raw().or(warp::any().map(String::new)).unify())
        .and(warp::header::headers_cloned())
        .map(
            |name: String,
             (is_get, body): (bool, Bytes),
             path: warp::path::FullPath,
             query: String,
             headers: HeaderMap| {
                let request = Callback {
                    is_get,
                    path: path.as_str().to_string(),
                    query,
                    headers,
                    body,
                };
                (name, request)
            },
        )
        .untuple_one()
        .and(with_state(state))
}

/// A provider's callback (a receipt, an inbound message) as it arrived.
pub(super) struct Callback {
    pub(super) is_get: bool,
    path: String,
    pub(super) query: String,
    headers: HeaderMap,
    pub(super) body: Bytes,
}

impl Callback {
    /// A POST with this body and no headers.
    #[cfg(test)]
    pub(super) fn for_test(body: &'static [u8]) -> Self {
        Self {
            is_get: false,
            path: String::new(),
            query: String::new(),
            headers: HeaderMap::new(),
            body: Bytes::from_static(body),
        }
    }

    fn header(&self, name: &str) -> Option<&str> {
        self.headers.get(name).and_then(|v| v.to_str().ok())
    }

    pub(super) fn form(&self) -> Vec<(String, String)> {
        form_urlencoded::parse(&self.body).into_owned().collect()
    }

    pub(super) fn is_json(&self) -> bool {
        self.header("content-type")
            .is_some_and(|t| t.to_ascii_lowercase().contains("json"))
    }
}

async fn receive(state: State, name: String, request: Callback) -> Result<Response, ApiError> {
    let provider = authenticate(&state, &name, &request)?;
    let receipts = match provider.kind {
        ProviderKind::Twilio => twilio_receipts(&request.form())?,
        ProviderKind::Vonage => vonage_receipts(&request)?,
        ProviderKind::Infobip => infobip_receipts(&request)?,
        ProviderKind::HttpJson => http_json_receipts(&request)?,
    };
    let mut outcomes = Vec::with_capacity(receipts.len());
    for receipt in &receipts {
        let Some(receipt) = receipt else {
            outcomes.push(json!({"outcome": "ignored"}));
            continue;
        };
        let outcome = state.store.record_receipt(receipt, Some(&name)).await?;
        state
            .metrics
            .delivery_receipts
            .with_label_values(&[receipt.status.as_str()])
            .inc();
        tracing::debug!(provider = %name, provider_message_id = %receipt.provider_message_id, status = receipt.status.as_str(), ?outcome, "delivery receipt");
        outcomes.push(json!({"message_id": receipt.provider_message_id, "outcome": outcome}));
    }
    Ok(json(StatusCode::OK, &json!({ "receipts": outcomes })))
}

/// The provider `name` a callback is for, once the callback proves it comes from that
/// provider (see the module comment): 404 for an unknown provider, 405 for a GET to
/// one that never calls that way, 403 or 401 for a bad signature or token.
pub(super) fn authenticate<'a>(
    state: &'a State,
    name: &str,
    request: &Callback,
) -> Result<&'a ProviderSpec, ApiError> {
    let Some(provider) = state.config.plan.provider(name) else {
        return Err(ApiError::NotFound(format!("there is no provider {name:?}")));
    };
    if request.is_get && provider.kind != ProviderKind::Vonage {
        return Err(ApiError::MethodNotAllowed);
    }
    match provider.kind {
        ProviderKind::Twilio => verify_twilio(provider, request)?,
        _ => check_token(state, request)?,
    }
    Ok(provider)
}

/// Twilio's request signature (its "Webhooks security" document): base64 of
/// HMAC-SHA1(auth token, URL + each POST parameter's name and value, sorted by name).
pub fn twilio_signature(auth_token: &str, url: &str, params: &[(String, String)]) -> String {
    use aws_lc_rs::hmac;
    let mut sorted: Vec<&(String, String)> = params.iter().collect();
    sorted.sort();
    let mut data = url.to_string();
    for (key, value) in sorted {
        data.push_str(key);
        data.push_str(value);
    }
    let key = hmac::Key::new(hmac::HMAC_SHA1_FOR_LEGACY_USE_ONLY, auth_token.as_bytes());
    base64::engine::general_purpose::STANDARD.encode(hmac::sign(&key, data.as_bytes()).as_ref())
}

fn verify_twilio(provider: &ProviderSpec, request: &Callback) -> Result<(), ApiError> {
    let forbidden = |why: &str| {
        tracing::warn!(provider = %provider.name, why, "Twilio callback refused");
        ApiError::Forbidden(format!("X-Twilio-Signature: {why}"))
    };
    let presented = request
        .header("x-twilio-signature")
        .ok_or_else(|| forbidden("missing"))?;
    let presented = base64::engine::general_purpose::STANDARD
        .decode(presented.trim())
        .map_err(|_| forbidden("not base64"))?;
    let query = if request.query.is_empty() {
        String::new()
    } else {
        format!("?{}", request.query)
    };
    let base = match &provider.public_url {
        Some(public) => public.clone(),
        None => {
            let host = request.header("host").unwrap_or("localhost");
            let scheme = request.header("x-forwarded-proto").unwrap_or("http");
            format!("{scheme}://{host}")
        }
    };
    let url = format!("{base}{}{query}", request.path);
    let expected = twilio_signature(provider.settings.token.expose(), &url, &request.form());
    let expected = base64::engine::general_purpose::STANDARD
        .decode(expected)
        .unwrap_or_default();
    // Constant time: the digests are compared whole.
    let same = expected.len() == presented.len()
        && expected
            .iter()
            .zip(&presented)
            .fold(0u8, |acc, (a, b)| acc | (a ^ b))
            == 0;
    if same {
        Ok(())
    } else {
        Err(forbidden("does not match this URL and body"))
    }
}

/// `DLR_TOKEN` (else `API_TOKEN`) as a Bearer token or the `token` query parameter.
fn check_token(state: &State, request: &Callback) -> Result<(), ApiError> {
    let config = &state.config;
    let Some(expected) = config.dlr_token.as_ref().or(config.api_token.as_ref()) else {
        return Ok(());
    };
    let bearer = request
        .header("authorization")
        .and_then(|h| h.trim().split_once(' '))
        .filter(|(scheme, _)| scheme.eq_ignore_ascii_case("bearer"))
        .map(|(_, token)| token.trim().to_string());
    let query = form_urlencoded::parse(request.query.as_bytes())
        .find(|(key, _)| key == "token")
        .map(|(_, value)| value.into_owned());
    let presented = bearer.or(query).unwrap_or_default();
    if super::auth::tokens_match(presented.as_bytes(), expected.expose().as_bytes()) {
        Ok(())
    } else {
        Err(ApiError::Unauthorized)
    }
}

/// A receipt whose status says what became of the message; `None` for an
/// intermediate one (queued, sent, accepted, buffered …), which changes nothing.
type Parsed = Option<Receipt>;

fn receipt(
    id: &str,
    status: Option<DeliveryStatus>,
    error: Option<&str>,
) -> Result<Parsed, ApiError> {
    let text = |name: &'static str, value: &str| -> Result<String, ApiError> {
        if (1..=MAX_TEXT).contains(&value.len()) && !value.contains('\0') {
            Ok(value.to_string())
        } else {
            Err(ApiError::validation(
                name,
                format!("{name} must be 1 to {MAX_TEXT} bytes"),
            ))
        }
    };
    let id = text("message_id", id)?;
    Ok(status.map(|status| Receipt {
        provider_message_id: id,
        status,
        error_code: error
            .filter(|e| !e.is_empty() && *e != "0")
            .and_then(|e| text("error_code", e).ok()),
        delivered_at: None,
    }))
}

pub(super) fn field<'a>(form: &'a [(String, String)], name: &str) -> Option<&'a str> {
    form.iter()
        .find(|(k, _)| k == name)
        .map(|(_, v)| v.as_str())
}

/// Twilio's status callback: `MessageSid`, `MessageStatus`, `ErrorCode`.
fn twilio_receipts(form: &[(String, String)]) -> Result<Vec<Parsed>, ApiError> {
    let id = field(form, "MessageSid")
        .or_else(|| field(form, "SmsSid"))
        .ok_or_else(|| ApiError::validation("MessageSid", "MessageSid is required"))?;
    let status = match field(form, "MessageStatus").or_else(|| field(form, "SmsStatus")) {
        Some("delivered") => Some(DeliveryStatus::Delivered),
        Some("undelivered") => Some(DeliveryStatus::Undelivered),
        Some("failed") => Some(DeliveryStatus::Failed),
        _ => None,
    };
    Ok(vec![receipt(id, status, field(form, "ErrorCode"))?])
}

/// Vonage's delivery receipt, as a form, JSON or the query string (its GET callbacks):
/// `messageId`, `status`, `err-code`.
fn vonage_receipts(request: &Callback) -> Result<Vec<Parsed>, ApiError> {
    let pairs = vonage_pairs(request)?;
    let id = field(&pairs, "messageId")
        .ok_or_else(|| ApiError::validation("messageId", "messageId is required"))?;
    let status = match field(&pairs, "status") {
        Some("delivered") => Some(DeliveryStatus::Delivered),
        Some("expired") => Some(DeliveryStatus::Undelivered),
        Some("failed" | "rejected") => Some(DeliveryStatus::Failed),
        _ => None,
    };
    Ok(vec![receipt(id, status, field(&pairs, "err-code"))?])
}

/// A Vonage callback's parameters, from a JSON body, a form body or the query string
/// (its GET callbacks); JSON values that are not strings are left out.
pub(super) fn vonage_pairs(request: &Callback) -> Result<Vec<(String, String)>, ApiError> {
    Ok(if request.is_json() {
        let value: Value = serde_json::from_slice(&request.body)
            .map_err(|err| ApiError::validation("body", format!("not JSON: {err}")))?;
        value
            .as_object()
            .map(|o| {
                o.iter()
                    .filter_map(|(k, v)| Some((k.clone(), v.as_str()?.to_string())))
                    .collect()
            })
            .unwrap_or_default()
    } else {
        let mut pairs = request.form();
        pairs.extend(form_urlencoded::parse(request.query.as_bytes()).into_owned());
        pairs
    })
}

/// The `results` array of an Infobip callback (its receipts and its received messages).
pub(super) fn infobip_results(request: &Callback) -> Result<Vec<Value>, ApiError> {
    let mut value: Value = serde_json::from_slice(&request.body)
        .map_err(|err| ApiError::validation("body", format!("not JSON: {err}")))?;
    match value["results"].take() {
        Value::Array(results) => Ok(results),
        _ => Err(ApiError::validation("results", "results must be an array")),
    }
}

/// Infobip's delivery report: `results[]` with `messageId`, `status.groupName` and
/// `error.name`.
fn infobip_receipts(request: &Callback) -> Result<Vec<Parsed>, ApiError> {
    infobip_results(request)?
        .iter()
        .map(|result| {
            let id = result["messageId"]
                .as_str()
                .ok_or_else(|| ApiError::validation("messageId", "messageId is required"))?;
            let status = match result.pointer("/status/groupName").and_then(Value::as_str) {
                Some("DELIVERED") => Some(DeliveryStatus::Delivered),
                Some("UNDELIVERABLE" | "EXPIRED") => Some(DeliveryStatus::Undelivered),
                Some("REJECTED") => Some(DeliveryStatus::Failed),
                _ => None,
            };
            let error = result.pointer("/error/name").and_then(Value::as_str);
            let error = error.filter(|name| *name != "NO_ERROR");
            receipt(id, status, error)
        })
        .collect()
}

/// Our own format, exactly as `POST /api/delivery-receipts` takes it.
fn http_json_receipts(request: &Callback) -> Result<Vec<Parsed>, ApiError> {
    let (receipts, _) = super::receipts::parse(&request.body)?;
    Ok(receipts.into_iter().map(Some).collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The example of Twilio's "Webhooks security" page: its auth token, URL and
    /// parameters give this signature.
    #[test]
    fn the_twilio_signature_matches_twilios_documented_example() {
        let params: Vec<(String, String)> = [
            ("CallSid", "CA1234567890ABCDE"),
            ("Caller", "+14158675310"),
            ("Digits", "1234"),
            ("From", "+14158675310"),
            ("To", "+18005551212"),
        ]
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
        assert_eq!(
            twilio_signature(
                "12345",
                "https://mycompany.com/myapp.php?foo=1&bar=2",
                &params
            ),
            "GvWf1cFY/Q7PnoempGyD5oXAezc="
        );
    }

    #[test]
    fn provider_statuses_map_onto_ours() {
        let form = |status: &str| {
            vec![
                ("MessageSid".to_string(), "SM1".to_string()),
                ("MessageStatus".to_string(), status.to_string()),
            ]
        };
        let status = |parsed: Vec<Parsed>| parsed[0].as_ref().map(|r| r.status);
        assert_eq!(
            status(twilio_receipts(&form("delivered")).unwrap()),
            Some(DeliveryStatus::Delivered)
        );
        assert_eq!(
            status(twilio_receipts(&form("undelivered")).unwrap()),
            Some(DeliveryStatus::Undelivered)
        );
        assert_eq!(status(twilio_receipts(&form("sent")).unwrap()), None);
        assert!(twilio_receipts(&[]).is_err());

        let infobip = Callback {
            is_get: false,
            path: String::new(),
            query: String::new(),
            headers: HeaderMap::new(),
            body: Bytes::from_static(
                br#"{"results":[{"messageId":"a","status":{"groupName":"DELIVERED"},"error":{"name":"NO_ERROR"}},
                               {"messageId":"b","status":{"groupName":"UNDELIVERABLE"},"error":{"name":"EC_ABSENT_SUBSCRIBER"}},
                               {"messageId":"c","status":{"groupName":"PENDING"}}]}"#,
            ),
        };
        let parsed = infobip_receipts(&infobip).unwrap();
        assert_eq!(
            parsed[0].as_ref().unwrap().status,
            DeliveryStatus::Delivered
        );
        assert_eq!(parsed[0].as_ref().unwrap().error_code, None);
        assert_eq!(
            parsed[1].as_ref().unwrap().error_code.as_deref(),
            Some("EC_ABSENT_SUBSCRIBER")
        );
        assert!(parsed[2].is_none());

        let vonage = Callback {
            is_get: true,
            path: String::new(),
            query: "messageId=0A1&status=expired&err-code=27".into(),
            headers: HeaderMap::new(),
            body: Bytes::new(),
        };
        let parsed = vonage_receipts(&vonage).unwrap();
        let receipt = parsed[0].as_ref().unwrap();
        assert_eq!(
            (receipt.status, receipt.error_code.as_deref()),
            (DeliveryStatus::Undelivered, Some("27"))
        );
    }
}
