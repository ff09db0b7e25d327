//! `POST /api/providers/{name}/inbound`: the recipients' replies, in each provider's own
//! format (docs/operations.md#opt-outs). A reply that is an opt-out keyword (STOP, …)
//! puts its sender on the opt-out list; START or UNSTOP takes it off
//! ([`Consent::of_reply`]). Other replies change nothing and are not kept.
//!
//! Formats, per kind (authentication as for receipts, `super::providers`):
//! - `http-json`: `{"from": "<E.164>", "to": "<sender>", "text": "..."}`;
//! - `twilio`: its incoming-message webhook, a form with `From`, `To`, `Body`; the
//!   answer is empty TwiML (no reply is sent);
//! - `vonage`: its inbound-SMS webhook, `msisdn`, `to`, `text` as JSON, a form or the
//!   query string;
//! - `infobip`: its received-messages push, `results[]` with `from`, `to`, `text`.
//!
//! Vonage and Infobip write numbers without the `+`; a number of digits only is read
//! as international.

use serde::{Deserialize, Serialize};
use serde_json::json;
use warp::http::StatusCode;
use warp::reply::{Reply, Response};

use super::providers::{Callback, authenticate, field, infobip_results, vonage_pairs};
use super::{ApiError, State, body, json};
use crate::config::ProviderKind;
use crate::domain::{Consent, PhoneNumber};

/// One reply as the provider passed it on.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Incoming {
    from: String,
    text: String,
}

/// What became of one reply.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
enum Outcome {
    /// The number is now on the list.
    OptedOut,
    /// It was on the list already, and keeps its first entry.
    AlreadyOptedOut,
    /// It is off the list now.
    OptedIn,
    /// It was not on the list.
    NotOptedOut,
    /// Not a keyword: nothing changed.
    Ignored,
    /// A keyword from something that is not a phone number (a short code, an
    /// alphanumeric sender): nothing changed.
    NotAPhoneNumber,
}

/// `http-json`'s inbound body.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct HttpJsonInbound {
    from: String,
    /// Our sender it was sent to; the list is per number, whichever sender it replied to.
    #[serde(default, rename = "to")]
    _to: Option<String>,
    text: String,
}

pub(super) async fn receive(
    state: State,
    name: String,
    request: Callback,
) -> Result<Response, ApiError> {
    let provider = authenticate(&state, &name, &request)?;
    let kind = provider.kind;
    let replies = match kind {
        ProviderKind::HttpJson => {
            let inbound: HttpJsonInbound = body::parse(&request.body)?;
            vec![Incoming {
                from: inbound.from,
                text: inbound.text,
            }]
        }
        ProviderKind::Twilio => twilio_replies(&request.form())?,
        ProviderKind::Vonage => vonage_replies(&vonage_pairs(&request)?)?,
        ProviderKind::Infobip => infobip_replies(&request)?,
    };
    let source = format!("inbound:{name}");
    let mut outcomes = Vec::with_capacity(replies.len());
    for reply in &replies {
        let outcome = apply(&state, reply, &source).await?;
        tracing::info!(provider = %name, ?outcome, "inbound message");
        outcomes.push(outcome);
    }
    if kind == ProviderKind::Twilio {
        // Twilio reads the answer as TwiML: an empty one sends no reply.
        return Ok(warp::reply::with_header(
            "<?xml version=\"1.0\" encoding=\"UTF-8\"?><Response></Response>",
            "content-type",
            "text/xml",
        )
        .into_response());
    }
    Ok(json(StatusCode::OK, &json!({ "messages": outcomes })))
}

/// Applies one reply to the list.
async fn apply(state: &State, reply: &Incoming, source: &str) -> Result<Outcome, ApiError> {
    let Some(consent) = Consent::of_reply(&reply.text) else {
        return Ok(Outcome::Ignored);
    };
    let Some(phone) = sender_number(&reply.from) else {
        return Ok(Outcome::NotAPhoneNumber);
    };
    let changes = &state.metrics.opt_out_changes;
    Ok(match consent {
        Consent::OptOut => {
            let (_, created) = state.store.opt_out(&phone, source).await?;
            if created {
                changes.with_label_values(&["opt_out", "inbound"]).inc();
                Outcome::OptedOut
            } else {
                Outcome::AlreadyOptedOut
            }
        }
        Consent::OptIn => {
            if state.store.opt_in(&phone).await? {
                changes.with_label_values(&["opt_in", "inbound"]).inc();
                Outcome::OptedIn
            } else {
                Outcome::NotOptedOut
            }
        }
    })
}

/// The sender's number in E.164; `None` for a short code or an alphanumeric sender.
/// Digits without a `+` (Vonage's and Infobip's form) are read as international. A
/// number libphonenumber does not know (a new range) is kept as it came, when it is `+`
/// and 7 to 15 digits: an opt-out is better listed than lost.
fn sender_number(from: &str) -> Option<String> {
    let from = from.trim();
    let international = format!("+{}", from.strip_prefix('+').unwrap_or(from));
    match PhoneNumber::parse(&international, None) {
        Ok(number) => Some(number.as_str().to_string()),
        Err(_) => {
            let digits = &international[1..];
            ((7..=15).contains(&digits.len()) && digits.bytes().all(|b| b.is_ascii_digit()))
                .then_some(international)
        }
    }
}

fn required<'a>(value: Option<&'a str>, name: &str) -> Result<&'a str, ApiError> {
    value.ok_or_else(|| ApiError::validation(name, format!("{name} is required")))
}

/// Twilio's incoming-message webhook: `From`, `Body`.
fn twilio_replies(form: &[(String, String)]) -> Result<Vec<Incoming>, ApiError> {
    Ok(vec![Incoming {
        from: required(field(form, "From"), "From")?.to_string(),
        text: field(form, "Body").unwrap_or_default().to_string(),
    }])
}

/// Vonage's inbound-SMS webhook: `msisdn` (the sender), `text`.
fn vonage_replies(pairs: &[(String, String)]) -> Result<Vec<Incoming>, ApiError> {
    Ok(vec![Incoming {
        from: required(field(pairs, "msisdn"), "msisdn")?.to_string(),
        text: field(pairs, "text").unwrap_or_default().to_string(),
    }])
}

/// Infobip's received-messages push: `results[]` with `from` and `text` (or
/// `cleanText`, the text without its keyword, when `text` is absent).
fn infobip_replies(request: &Callback) -> Result<Vec<Incoming>, ApiError> {
    infobip_results(request)?
        .iter()
        .map(|result| {
            Ok(Incoming {
                from: required(result["from"].as_str(), "from")?.to_string(),
                text: result["text"]
                    .as_str()
                    .or_else(|| result["cleanText"].as_str())
                    .unwrap_or_default()
                    .to_string(),
            })
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pairs(items: &[(&str, &str)]) -> Vec<(String, String)> {
        items
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    #[test]
    fn each_format_gives_the_sender_and_the_text() {
        let twilio = twilio_replies(&pairs(&[
            ("From", "+14155550100"),
            ("To", "+14155550199"),
            ("Body", "STOP"),
        ]))
        .unwrap();
        assert_eq!(twilio[0].from, "+14155550100");
        assert_eq!(twilio[0].text, "STOP");
        assert!(twilio_replies(&pairs(&[("Body", "STOP")])).is_err());

        let vonage =
            vonage_replies(&pairs(&[("msisdn", "447911123456"), ("text", "Stop")])).unwrap();
        assert_eq!(vonage[0].from, "447911123456");

        let infobip = Callback::for_test(
            br#"{"results":[{"from":"385916242493","to":"385921004026","text":"QUIT"},
                            {"from":"385916242494","to":"x","cleanText":"START"}]}"#,
        );
        let replies = infobip_replies(&infobip).unwrap();
        assert_eq!(replies.len(), 2);
        assert_eq!(replies[1].text, "START");
    }

    #[test]
    fn a_sender_without_a_plus_is_read_as_international() {
        assert_eq!(
            sender_number("447911123456").map(|p| p.as_str().to_string()),
            Some("+447911123456".into())
        );
        assert!(sender_number("ACME").is_none());
        assert!(
            sender_number("12345").is_none(),
            "a short code is not a number"
        );
    }
}
