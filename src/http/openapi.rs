//! `GET /openapi.json`: a hand-written OpenAPI 3 document of the routes in this module.
//! Kept next to the routes; `tests/api` checks that every route answers as described
//! and schemathesis fuzzes the API against it.

use serde_json::{Value, json};
use warp::http::StatusCode;
use warp::reply::Response;

use crate::version::BUILD;

/// The document, made once at start (see [`for_replica`]).
pub fn document(spec: &Value) -> Response {
    super::json(StatusCode::OK, spec)
}

/// The document for a replica whose configured lanes are `lanes` and providers
/// `providers`: a lane anywhere in a request is one of them, and so is a provider named
/// in a path (an unknown one is refused, so the document says so).
pub fn for_replica(max_content_chars: usize, lanes: &[String], providers: &[String]) -> Value {
    let mut spec = spec(max_content_chars);
    pin_lanes(&mut spec, lanes);
    for endpoint in ["receipts", "inbound"] {
        if let Some(schema) =
            spec["paths"][format!("/api/providers/{{name}}/{endpoint}")]["post"]["parameters"]
                .as_array_mut()
                .and_then(|params| params.iter_mut().find(|p| p["name"] == "name"))
                .and_then(|param| param["schema"].as_object_mut())
        {
            schema.remove("pattern");
            schema.insert("enum".into(), json!(providers));
        }
    }
    // The list's `lane=` left empty means any lane, as `status=` does.
    if let Some(names) = spec["paths"]["/api/messages"]["get"]["parameters"]
        .as_array_mut()
        .and_then(|params| params.iter_mut().find(|p| p["name"] == "lane"))
        .and_then(|param| param["schema"]["enum"].as_array_mut())
    {
        names.push(json!(""));
    }
    spec
}

/// Replaces every lane's name pattern with the list of the configured lanes (and null
/// where the field may be null).
fn pin_lanes(value: &mut Value, lanes: &[String]) {
    match value {
        Value::Object(object) => {
            if object.get("pattern").and_then(Value::as_str) == Some(LANE_PATTERN) {
                let nullable = object
                    .get("type")
                    .and_then(Value::as_array)
                    .is_some_and(|types| types.iter().any(|t| t == "null"));
                let mut names: Vec<Value> = lanes.iter().map(|l| json!(l)).collect();
                if nullable {
                    names.push(Value::Null);
                }
                object.remove("pattern");
                object.insert("enum".into(), Value::Array(names));
            }
            for child in object.values_mut() {
                pin_lanes(child, lanes);
            }
        }
        Value::Array(items) => items.iter_mut().for_each(|item| pin_lanes(item, lanes)),
        _ => {}
    }
}

/// Characters `char::is_whitespace` knows (Unicode White_Space), spelled out so that
/// every regex engine reads "not blank" the way the API does.
const WHITESPACE_CLASS: &str =
    "\\t\\n\\u000b\\f\\r \\u0085\\u00a0\\u1680\\u2000-\\u200a\\u2028\\u2029\\u202f\\u205f\\u3000";

/// A duration as `duration::parse` reads it, bounded so every match also fits.
const DURATION_PATTERN: &str = "^(0|([0-9]{1,6}(\\.[0-9]{1,9})?(ns|us|µs|ms|s|m|h)){1,4})$";

/// RFC 3339 with an offset, as `domain::parse_time` reads it: a real calendar date
/// (leap years included), `T`, seconds 00–59, up to 9 fraction digits, `Z` or ±HH:MM.
const RFC3339_PATTERN: &str = concat!(
    "^(?:[0-9]{4}-(?:(?:0[13578]|1[02])-(?:0[1-9]|[12][0-9]|3[01])|(?:0[469]|11)-(?:0[1-9]|[12][0-9]|30)|02-(?:0[1-9]|1[0-9]|2[0-8]))",
    "|(?:[0-9]{2}(?:0[48]|[2468][048]|[13579][26])|(?:[02468][048]|[13579][26])00)-02-29)",
    "[Tt](?:[01][0-9]|2[0-3]):[0-5][0-9]:[0-5][0-9](?:\\.[0-9]{1,9})?(?:[Zz]|[+-](?:[01][0-9]|2[0-3]):[0-5][0-9])$"
);

const STATUSES: [&str; 7] = [
    "pending",
    "sending",
    "sent",
    "failed",
    "expired",
    "cancelled",
    "blocked",
];

/// A lane's name, as `DISPATCH_CONFIG` allows it.
const LANE_PATTERN: &str = "^[a-z0-9][a-z0-9_-]{0,31}$";

/// A provider's name in a path: the lanes' alphabet, written differently so that
/// `pin_lanes` leaves it alone.
const PROVIDER_PATTERN: &str = "^[a-z0-9][-a-z0-9_]{0,31}$";

/// What `domain::Sender::parse` accepts.
const SENDER_PATTERN: &str = "^(\\+[0-9]{4,15}|[A-Za-z0-9]([A-Za-z0-9 ]{0,9}[A-Za-z0-9])?)$";

/// An idempotency key: 1–255 visible ASCII characters.
const IDEMPOTENCY_KEY_PATTERN: &str = "^[!-~]{1,255}$";

/// Each documented path template, split at `/`, with its methods.
fn templates() -> &'static [(String, Vec<String>)] {
    static ROUTES: std::sync::OnceLock<Vec<(String, Vec<String>)>> = std::sync::OnceLock::new();
    ROUTES.get_or_init(|| {
        paths()
            .as_object()
            .map(|paths| {
                paths
                    .iter()
                    .map(|(template, operations)| {
                        let methods = operations
                            .as_object()
                            .map(|ops| ops.keys().map(|m| m.to_uppercase()).collect())
                            .unwrap_or_default();
                        (template.clone(), methods)
                    })
                    .collect()
            })
            .unwrap_or_default()
    })
}

/// The documented templates a concrete request path matches (`{id}` matches an
/// integer, a named parameter any segment), with their methods.
fn matching(path: &str) -> impl Iterator<Item = &'static (String, Vec<String>)> {
    let requested: Vec<&str> = path.split('/').collect();
    templates().iter().filter(move |(template, _)| {
        let segments: Vec<&str> = template.split('/').collect();
        segments.len() == requested.len()
            && segments.iter().zip(&requested).all(|(template, actual)| {
                if *template == "{id}" {
                    actual.parse::<i64>().is_ok()
                } else if template.starts_with('{') {
                    !actual.is_empty()
                } else {
                    template == actual
                }
            })
    })
}

/// The methods the document lists for a concrete request path, for the `Allow`
/// header of a 405.
pub fn allowed_methods(path: &str) -> Vec<String> {
    matching(path)
        .flat_map(|(_, methods)| methods.iter().cloned())
        .collect()
}

/// The documented template a request path matches (`/api/messages/{id}`), for
/// metric labels that never carry an id. A literal path wins over a template one
/// (`/api/messages/stats` over `/api/messages/{id}`).
pub fn route_template(path: &str) -> Option<&'static str> {
    matching(path)
        .map(|(template, _)| template.as_str())
        .min_by_key(|template| template.matches('{').count())
}

fn error_response(description: &str) -> Value {
    json!({"description": description, "content": {"application/json": {"schema": {"$ref": "#/components/schemas/Error"}}}})
}

fn json_response(description: &str, schema: Value) -> Value {
    json!({"description": description, "content": {"application/json": {"schema": schema}}})
}

/// The filter body of a bulk action on messages in `status` (the only one it takes).
fn bulk_filter(status: &str) -> Value {
    json!({
        "type": "object",
        "additionalProperties": false,
        "required": ["status"],
        "properties": {
            "status": {"const": status},
            "phone_number": {"type": ["string", "null"], "pattern": "^\\+?[0-9]+$", "minLength": 1, "maxLength": 20, "description": "E.164 (or national with DEFAULT_REGION), or exactly as stored"},
            "since": {"type": ["string", "null"], "format": "date-time", "pattern": RFC3339_PATTERN, "description": "created at or after"},
            "until": {"type": ["string", "null"], "format": "date-time", "pattern": RFC3339_PATTERN, "description": "created before"},
            "lane": {"type": ["string", "null"], "pattern": LANE_PATTERN, "description": "a configured lane (GET /api/lanes)"}
        }
    })
}

fn schema_ref(name: &str) -> Value {
    json!({"$ref": format!("#/components/schemas/{name}")})
}

/// The errors every `/api` operation may answer.
fn api_errors(mut responses: serde_json::Map<String, Value>) -> Value {
    responses.insert(
        "401".into(),
        error_response("API_TOKEN is set and the request lacks it"),
    );
    responses.insert(
        "503".into(),
        error_response(
            "PostgreSQL is unavailable, or the replica is still applying migrations (with Retry-After)",
        ),
    );
    Value::Object(responses)
}

/// The errors of every `/api` operation that changes something, added to what
/// [`api_errors`] lists: a browser request from another origin, a body that is not JSON.
fn change_errors(paths: &mut Value) {
    let Some(paths) = paths.as_object_mut() else {
        return;
    };
    for (path, operations) in paths.iter_mut() {
        if !path.starts_with("/api/") {
            continue;
        }
        for (method, operation) in operations.as_object_mut().into_iter().flatten() {
            if !matches!(method.as_str(), "post" | "put" | "patch" | "delete") {
                continue;
            }
            if let Some(responses) = operation["responses"].as_object_mut() {
                responses.insert(
                    "403".into(),
                    error_response(
                        "a browser request from another origin (Origin or Sec-Fetch-Site)",
                    ),
                );
                responses.insert(
                    "415".into(),
                    error_response("a body that is not Content-Type: application/json"),
                );
            }
        }
    }
}

fn responses(pairs: &[(&str, Value)]) -> serde_json::Map<String, Value> {
    pairs
        .iter()
        .map(|(k, v)| (k.to_string(), v.clone()))
        .collect()
}

fn spec(max_content_chars: usize) -> Value {
    let mut paths = paths();
    change_errors(&mut paths);
    json!({
        "openapi": "3.1.0",
        "info": {
            "title": "message-dispatcher",
            "version": BUILD.version,
            "description": "Drains a PostgreSQL queue of SMS messages into a provider's HTTP API. Every replica serves this API; control operations act on the whole cluster."
        },
        "components": {
            "securitySchemes": {"bearer": {"type": "http", "scheme": "bearer", "description": "Required on /api/* only when API_TOKEN is set"}},
            "schemas": schemas(max_content_chars)
        },
        "paths": paths
    })
}

fn schemas(max_content_chars: usize) -> Value {
    let content = json!({
        "type": "string",
        "minLength": 1,
        "maxLength": max_content_chars,
        "description": "not blank, no NUL characters; at most MESSAGE_MAX_LENGTH characters",
        "allOf": [
            {"pattern": "^[^\\u0000]*$"},
            {"pattern": format!("[^{WHITESPACE_CLASS}]")}
        ]
    });
    let timestamp = json!({"type": "string", "format": "date-time"});
    let nullable_timestamp = json!({"type": ["string", "null"], "format": "date-time"});
    json!({
        "Error": {
            "type": "object",
            "required": ["error"],
            "properties": {"error": {
                "type": "object",
                "required": ["code", "message"],
                "properties": {
                    "code": {"type": "string"},
                    "message": {"type": "string"},
                    "field": {"type": ["string", "null"]},
                    "index": {"type": ["integer", "null"]}
                }
            }}
        },
        "Version": {
            "type": "object",
            "required": ["version", "commit", "build_time"],
            "properties": {"version": {"type": "string"}, "commit": {"type": "string"}, "build_time": {"type": "string"}}
        },
        "Health": {
            "type": "object",
            "required": ["status", "processing_status", "leader", "replica_id", "version", "dependencies"],
            "properties": {
                "status": {"enum": ["healthy", "degraded", "unhealthy"]},
                "processing_status": {"enum": ["running", "stopped"]},
                "paused_reason": {"enum": ["provider_auth", "spend_cap", null], "description": "the default lane's dispatch paused while running (the status is then degraded)"},
                "leader": {"type": "boolean"},
                "replica_id": {"type": "string"},
                "version": schema_ref("Version"),
                "dependencies": {
                    "type": "object",
                    "required": ["database", "redis"],
                    "properties": {
                        "database": {"enum": ["healthy", "unhealthy"]},
                        "redis": {"enum": ["healthy", "unhealthy"]}
                    }
                }
            }
        },
        "WebhookEvent": {
            "type": "object",
            "required": ["id", "webhook_id", "message_id", "type", "url", "payload", "status", "attempts", "created_at", "window_start", "next_attempt_at", "last_error", "delivered_at"],
            "properties": {
                "id": {"type": "integer", "format": "int64"},
                "webhook_id": {"type": "string", "description": "the webhook-id header, the same on every attempt"},
                "message_id": {"type": "integer", "format": "int64"},
                "type": {"enum": ["message.sent", "message.failed", "message.expired", "message.cancelled", "message.blocked", "message.delivered", "message.undelivered"]},
                "url": {"type": ["string", "null"], "description": "the message's own endpoint; null: STATUS_WEBHOOK_URL"},
                "payload": {"type": "object", "description": "the body posted: type, timestamp, data"},
                "status": {"enum": ["pending", "delivered", "failed"]},
                "attempts": {"type": "integer"},
                "created_at": timestamp,
                "window_start": timestamp,
                "next_attempt_at": timestamp,
                "last_error": {"type": ["string", "null"]},
                "delivered_at": nullable_timestamp
            }
        },
        "OptOut": {
            "type": "object",
            "required": ["phone_number", "country", "since", "source"],
            "properties": {
                "phone_number": {"type": "string", "description": "E.164"},
                "country": {"type": ["string", "null"], "description": "ISO 3166 region of the number"},
                "since": timestamp,
                "source": {"type": "string", "description": "api (or what the PUT named), or inbound:<provider> for a STOP a provider passed on"}
            }
        },
        "Probe": {"type": "object", "required": ["status"], "properties": {"status": {"type": "string"}, "reason": {"type": "string"}}},
        "NewMessage": {
            "type": "object",
            "additionalProperties": false,
            "required": ["phone_number", "content"],
            "properties": {
                "phone_number": {"type": "string", "pattern": "^\\+?[0-9]{1,17}$", "description": "E.164 (+ and the country code, like +905551234567), checked against the country's numbering plan; national formats only when DEFAULT_REGION is set. Stored and shown in E.164."},
                "content": content,
                "idempotency_key": {"type": ["string", "null"], "pattern": IDEMPOTENCY_KEY_PATTERN, "description": "a repeat with the same key and payload returns the original message (200); a different payload gets 409"},
                "send_at": {"type": ["string", "null"], "format": "date-time", "pattern": RFC3339_PATTERN, "description": "not dispatched before this time (RFC 3339 with offset; a past value means now)"},
                "expires_at": {"type": ["string", "null"], "format": "date-time", "pattern": RFC3339_PATTERN, "description": "never sent at or after this time (status expired); must be after send_at"},
                "priority": {"type": ["integer", "null"], "minimum": 0, "maximum": 3, "description": "SMPP priority_flag, 3 most urgent; default 0"},
                "lane": {"type": ["string", "null"], "pattern": LANE_PATTERN, "description": "the lane to send through (GET /api/lanes); absent: the first route that matches the number, else default. An unknown lane is a 422."},
                "from": {"type": ["string", "null"], "pattern": SENDER_PATTERN, "description": "the sender: E.164 (+ and 4 to 15 digits) or 1 to 11 letters, digits and inner spaces; absent: the lane's, else the provider's"},
                "category": {"enum": ["transactional", "marketing", null], "description": "transactional goes out in the lane's quiet hours; marketing (or none) waits for them to end"},
                "status_callback_url": {"type": ["string", "null"], "format": "uri", "pattern": "^https?://[^/?#\\s]+", "maxLength": 2048, "description": "where this message's status webhooks go instead of STATUS_WEBHOOK_URL (needs STATUS_WEBHOOK_SECRET)"}
            }
        },
        "Receipt": {
            "type": "object",
            "additionalProperties": false,
            "required": ["message_id", "status"],
            "properties": {
                "message_id": {"type": "string", "minLength": 1, "maxLength": 255, "pattern": "^[^\\u0000]*$", "description": "the provider's messageId"},
                "status": {"enum": ["delivered", "undelivered", "failed"]},
                "error_code": {"type": ["string", "null"], "minLength": 1, "maxLength": 255, "pattern": "^[^\\u0000]*$"},
                "delivered_at": {"type": ["string", "null"], "format": "date-time", "pattern": RFC3339_PATTERN}
            }
        },
        "ReceiptOutcome": {
            "type": "object",
            "required": ["message_id", "outcome"],
            "properties": {
                "message_id": {"type": "string"},
                "outcome": {"enum": ["applied", "already_delivered", "held"], "description": "held: no message carries this id yet; applied once one does"}
            }
        },
        "Stats": {
            "type": "object",
            "required": ["by_status", "scheduled", "oldest_pending_age_seconds", "oldest_pending_age_seconds_by_priority", "sent_last_minute", "sent_last_hour", "delivery", "spend_today"],
            "properties": {
                "by_status": {"type": "object", "required": ["pending", "sending", "sent", "failed", "expired", "cancelled", "blocked"], "additionalProperties": {"type": "integer"}},
                "scheduled": {"type": "integer"},
                "oldest_pending_age_seconds": {"type": ["number", "null"]},
                "oldest_pending_age_seconds_by_priority": {
                    "type": "object",
                    "description": "per priority 0 to 3; priorities are served strictly in order, so a higher one above the rate starves the lower ones",
                    "required": ["0", "1", "2", "3"],
                    "additionalProperties": {"type": ["number", "null"]}
                },
                "sent_last_minute": {"type": "integer"},
                "sent_last_hour": {"type": "integer"},
                "delivery": {"type": "object", "required": ["delivered", "undelivered", "failed", "awaiting"], "additionalProperties": {"type": "integer"}},
                "spend_today": {"type": "array", "description": "what each lane spent this UTC day through each provider (providers with a price_per_segment)", "items": {
                    "type": "object",
                    "required": ["lane", "provider", "amount", "messages"],
                    "properties": {"lane": {"type": "string"}, "provider": {"type": "string"}, "amount": {"type": "number"}, "messages": {"type": "integer"}}
                }}
            }
        },
        "Message": {
            "type": "object",
            "required": ["id", "phone_number", "country", "delivery_key", "content", "status", "sent", "attempts", "next_attempt_at", "created_at", "sent_at", "message_id", "last_error", "cached_at",
                         "idempotency_key", "send_at", "expires_at", "priority", "lane", "from", "category", "status_callback_url", "provider", "encoding", "segments", "delivery_status", "delivered_at", "delivery_error"],
            "properties": {
                "id": {"type": "integer", "format": "int64"},
                "phone_number": {"type": "string"},
                "country": {"type": ["string", "null"], "description": "ISO 3166 region of the number (TR), from its country code"},
                "delivery_key": {"type": "string", "description": "the Idempotency-Key of every send of this message: a UUID made with the row (its id for rows from before migration 0011, and for messages an earlier version sent first)"},
                "content": {"type": ["string", "null"], "description": "null once CONTENT_RETENTION has removed a finished message's text"},
                "status": {"enum": STATUSES},
                "idempotency_key": {"type": ["string", "null"]},
                "send_at": nullable_timestamp,
                "expires_at": nullable_timestamp,
                "priority": {"type": "integer", "minimum": 0, "maximum": 3},
                "lane": {"type": "string", "description": "the lane it is sent through"},
                "from": {"type": ["string", "null"], "description": "the sender it names; null: its lane's or provider's"},
                "category": {"enum": ["transactional", "marketing", null], "description": "null: none named (held in quiet hours like marketing)"},
                "status_callback_url": {"type": ["string", "null"]},
                "provider": {"type": ["string", "null"], "description": "the provider that took it (sent), or its current or last send went to"},
                "encoding": {"enum": ["gsm7", "ucs2", null], "description": "null with the content"},
                "segments": {"type": ["integer", "null"], "minimum": 1},
                "delivery_status": {"enum": ["delivered", "undelivered", "failed", null]},
                "delivered_at": nullable_timestamp,
                "delivery_error": {"type": ["string", "null"]},
                "sent": {"type": "boolean"},
                "attempts": {"type": "integer"},
                "next_attempt_at": timestamp,
                "created_at": timestamp,
                "sent_at": nullable_timestamp,
                "message_id": {"type": ["string", "null"], "description": "the provider's id"},
                "last_error": {"type": ["string", "null"]},
                "cached_at": nullable_timestamp
            }
        },
        "SentMessage": {
            "type": "object",
            "required": ["id", "phone_number", "content", "sent", "created_at", "sent_at", "message_id", "cached_at"],
            "properties": {
                "id": {"type": "integer", "format": "int64"},
                "phone_number": {"type": "string"},
                "content": {"type": ["string", "null"]},
                "sent": {"type": "boolean"},
                "created_at": timestamp,
                "sent_at": nullable_timestamp,
                "message_id": {"type": ["string", "null"]},
                "cached_at": nullable_timestamp
            }
        },
        "MessagePage": {
            "type": "object",
            "required": ["messages", "total", "total_exact", "next_cursor"],
            "properties": {
                "messages": {"type": "array", "items": schema_ref("Message")},
                "total": {"type": "integer", "description": "rows the filter matches, counted up to 10000 unless total=exact"},
                "total_exact": {"type": "boolean", "description": "false: more than 10000 rows match; total is then 10000"},
                "next_cursor": {"type": ["integer", "null"]}
            }
        },
        "SentPage": {
            "type": "object",
            "required": ["messages", "total", "total_exact", "next_cursor"],
            "properties": {
                "messages": {"type": "array", "items": schema_ref("SentMessage")},
                "total": {"type": "integer", "description": "rows the filter matches, counted up to 10000 unless total=exact"},
                "total_exact": {"type": "boolean", "description": "false: more than 10000 rows match; total is then 10000"},
                "next_cursor": {"type": ["integer", "null"]}
            }
        },
        "Activity": {
            "type": "object",
            "required": ["from", "until", "seconds"],
            "description": "sent, failed and retried per second in (from, until]; seconds without activity are left out",
            "properties": {
                "from": timestamp,
                "until": timestamp,
                "seconds": {"type": "array", "items": {
                    "type": "object",
                    "required": ["at", "sent", "failed", "retried"],
                    "properties": {
                        "at": timestamp,
                        "sent": {"type": "integer"},
                        "failed": {"type": "integer"},
                        "retried": {"type": "integer"}
                    }
                }}
            }
        },
        "RetryFilter": bulk_filter("failed"),
        "CancelFilter": bulk_filter("pending"),
        "Lanes": {
            "type": "object",
            "required": ["lanes", "unconfigured"],
            "properties": {
              "unconfigured": {"type": "array", "description": "lanes DISPATCH_CONFIG no longer names that still hold pending or sending messages: nobody sends them", "items": {"type": "object", "properties": {"name": {"type": "string"}, "pending": {"type": "integer"}, "sending": {"type": "integer"}}}},
              "lanes": {"type": "array", "items": {
                "type": "object",
                "required": ["name", "leader", "running", "paused_reason", "batch_size", "interval", "unit", "pending", "sending", "sent_last_minute", "providers"],
                "properties": {
                    "name": {"type": "string"},
                    "leader": {"type": ["object", "null"], "properties": {"replica_id": {"type": "string"}, "epoch": {"type": "integer"}, "since": nullable_timestamp}},
                    "assigned_to": {"type": ["string", "null"], "description": "the replica the spread prefers for this lane"},
                    "running": {"type": "boolean"},
                    "paused_reason": {"type": ["string", "null"], "description": "provider_auth: the provider refuses our credentials; spend_cap: the lane reached its daily spend cap"},
                    "batch_size": {"type": "integer", "minimum": 1},
                    "interval": {"type": "string"},
                    "interval_ms": {"type": "integer"},
                    "unit": {"enum": ["messages", "segments"]},
                    "send_concurrency": {"type": "integer"},
                    "countries": {"type": "array", "items": {"type": "string"}, "description": "the only countries the lane sends to (ISO codes); empty: any"},
                    "quiet_hours": {"type": ["string", "null"], "description": "HH:MM-HH:MM in the recipient's local time: only transactional messages go out inside it"},
                    "spend_today": {"type": "number", "description": "what the lane spent this UTC day, in the prices' currency"},
                    "daily_spend_cap": {"type": ["number", "null"], "description": "the cap in force (configured or set at run time); null: none"},
                    "configured_rate_per_second": {"type": ["number", "null"], "description": "null: no limit (interval 0)"},
                    "achieved_rate_per_second": {"type": "number", "description": "sends in the last minute / 60"},
                    "pending": {"type": "integer"},
                    "sending": {"type": "integer"},
                    "sent_last_minute": {"type": "integer"},
                    "last_batch_at": nullable_timestamp,
                    "effective_rate_per_second": {"type": ["number", "null"], "description": "the configured rate lowered by provider throttling, as of the leader's last batch; null: no limit"},
                    "rate_factor": {"type": "number", "description": "effective / configured rate (1: not throttled)"},
                    "providers": {"type": "array", "description": "in the order the lane tries them; states as of the leader's last batch", "items": {"type": "object", "required": ["name", "kind", "state"], "properties": {
                        "name": {"type": "string"}, "kind": {"enum": ["http-json", "twilio", "vonage", "infobip"]},
                        "state": {"enum": ["closed", "open", "half_open"], "description": "the circuit breaker: open sends through the next provider"},
                        "open_until": nullable_timestamp,
                        "throttled_until": nullable_timestamp,
                        "failures_in_a_row": {"type": "integer"},
                        "failure_share": {"type": "number"}
                    }}},
                    "config": schema_ref("Schedule")
                }
            }}
            }
        },
        "LaneControlAnswer": {
            "type": "object",
            "required": ["lane", "status", "changed"],
            "properties": {"lane": {"type": "string"}, "status": {"enum": ["started", "running", "stopped"]}, "changed": {"type": "boolean"}}
        },
        "ControlAnswer": {
            "type": "object",
            "required": ["status", "message"],
            "properties": {"status": {"enum": ["started", "running", "stopped"]}, "message": {"type": "string"}}
        },
        "Schedule": {
            "type": "object",
            "required": ["batch_size", "processing_interval", "processing_interval_ms", "overrides"],
            "properties": {
                "batch_size": {"type": "integer"},
                "processing_interval": {"type": "string"},
                "processing_interval_ms": {"type": "integer"},
                "daily_spend_cap": {"type": ["number", "null"], "description": "the lane's daily spend cap in force; null: none"},
                "configured": {
                    "type": "object",
                    "description": "the configured values (BATCH_SIZE, PROCESSING_INTERVAL, the lane's daily_spend_cap), which an override shadows",
                    "properties": {
                        "batch_size": {"type": "integer"},
                        "processing_interval": {"type": "string"},
                        "daily_spend_cap": {"type": ["number", "null"]}
                    }
                },
                "overrides": {
                    "type": "object",
                    "properties": {
                        "batch_size": {"type": ["integer", "null"]},
                        "processing_interval": {"type": ["string", "null"]},
                        "daily_spend_cap": {"type": ["number", "null"]},
                        "batch_size_set": schema_ref("SetBy"),
                        "processing_interval_set": schema_ref("SetBy"),
                        "daily_spend_cap_set": schema_ref("SetBy")
                    }
                },
                "updated_at": timestamp,
                "updated_by": {"type": ["string", "null"]}
            }
        },
        "ConfigChange": {
            "type": "object",
            "additionalProperties": false,
            "minProperties": 1,
            "properties": {
                "batch_size": {"type": ["integer", "null"], "minimum": 1, "maximum": 10000},
                "processing_interval": {"type": ["string", "null"], "pattern": DURATION_PATTERN, "examples": ["30s", "2m", "500ms"], "description": "a whole number of milliseconds (0s: back to back); a finer one is refused (422), as it would be stored rounded down and could lift the rate limit"},
                "daily_spend_cap": {"type": ["number", "null"], "minimum": 0, "maximum": 1000000000000_i64, "description": "the most the lane may spend in a UTC day, in the prices' currency, to the millionth (a finer amount is refused, 422); reaching it pauses the lane (reason spend_cap) until UTC midnight or a higher cap; null: back to the configured cap"}
            }
        },
        "SetBy": {
            "type": ["object", "null"],
            "description": "who set the override, and when (null: no override)",
            "properties": {"by": {"type": ["string", "null"]}, "at": timestamp}
        },
        "Status": {
            "type": "object",
            "required": ["running", "paused_reason", "paused", "leader", "last_batch_at", "next_batch_at", "batch_size", "processing_interval", "this_replica", "replicas"],
            "properties": {
                "running": {"type": "boolean"},
                "paused_reason": {"enum": ["provider_auth", "spend_cap", null], "description": "provider_auth: the provider refuses our credentials (401/403); messages wait without spending attempts, a probe goes out once per LOCK_RETRY_INTERVAL. spend_cap: the lane reached its daily spend cap; it resumes at UTC midnight or with a higher cap"},
                "paused": {
                    "type": ["object", "null"],
                    "properties": {
                        "reason": {"type": "string"},
                        "since": timestamp,
                        "detail": {"type": ["string", "null"], "description": "the provider's answer, or the day's spend against the cap"}
                    }
                },
                "leader": {
                    "type": ["object", "null"],
                    "properties": {
                        "replica_id": {"type": "string"},
                        "epoch": {"type": "integer"},
                        "since": nullable_timestamp,
                        "alive": {"type": "boolean"}
                    }
                },
                "last_batch_at": nullable_timestamp,
                "next_batch_at": nullable_timestamp,
                "batch_size": {"type": "integer"},
                "processing_interval": {"type": "string"},
                "processing_interval_ms": {"type": "integer"},
                "config": schema_ref("Schedule"),
                "this_replica": {
                    "type": "object",
                    "required": ["replica_id", "leader"],
                    "properties": {"replica_id": {"type": "string"}, "leader": {"type": "boolean"}, "epoch": {"type": ["integer", "null"]}}
                },
                "replicas": {"type": "array", "items": {
                    "type": "object",
                    "required": ["replica_id", "version", "started_at", "last_seen_at"],
                    "properties": {
                        "replica_id": {"type": "string"},
                        "version": {"type": "string"},
                        "started_at": timestamp,
                        "last_seen_at": timestamp
                    }
                }}
            }
        }
    })
}

fn paths() -> Value {
    let lane_param = json!({"name": "name", "in": "path", "required": true, "description": "a configured lane", "schema": {"type": "string", "minLength": 1, "maxLength": 64}});
    let page_params = json!([
        {"name": "limit", "in": "query", "required": false, "schema": {"type": "integer", "minimum": 1, "maximum": 500, "default": 50}},
        {"name": "cursor", "in": "query", "required": false, "description": "next_cursor of the previous page", "schema": {"type": "integer", "format": "int64", "minimum": 1, "maximum": i64::MAX}},
        {"name": "total", "in": "query", "required": false, "description": "exact: count every matching row (slow on a large table); bounded (default): up to 10000", "schema": {"enum": ["exact", "bounded"], "default": "bounded"}}
    ]);
    let id_param = json!({"name": "id", "in": "path", "required": true, "schema": {"type": "integer", "format": "int64", "minimum": 1}});
    let phone_param = json!({"name": "phone_number", "in": "path", "required": true, "description": "E.164 (+ as %2B or as is), or national with DEFAULT_REGION", "schema": {"type": "string", "pattern": "^(\\+|%2[Bb])?[0-9]{1,17}$"}});
    json!({
        "/health": {"get": {
            "summary": "Overall health with dependencies",
            "operationId": "health",
            "responses": {
                "200": json_response("healthy or degraded (Redis down)", schema_ref("Health")),
                "503": json_response("unhealthy: PostgreSQL down", schema_ref("Health"))
            }
        }},
        "/health/live": {"get": {
            "summary": "Liveness: the process serves requests",
            "operationId": "live",
            "responses": {"200": json_response("alive", schema_ref("Probe"))}
        }},
        "/health/ready": {"get": {
            "summary": "Readiness: PostgreSQL answers, migrations applied, not shutting down",
            "operationId": "ready",
            "responses": {
                "200": json_response("ready", schema_ref("Probe")),
                "503": json_response("not ready", schema_ref("Probe"))
            }
        }},
        "/version": {"get": {
            "summary": "Version, commit and build time",
            "operationId": "version",
            "responses": {"200": json_response("build information", schema_ref("Version"))}
        }},
        "/metrics": {"get": {
            "summary": "Prometheus metrics (text format)",
            "operationId": "metrics",
            "responses": {"200": {"description": "metrics", "content": {"text/plain": {"schema": {"type": "string"}}}}}
        }},
        "/openapi.json": {"get": {
            "summary": "This document",
            "operationId": "openapi",
            "responses": {"200": json_response("OpenAPI document", json!({"type": "object"}))}
        }},
        "/api/messaging/start": {"post": {
            "summary": "Start processing on the whole cluster",
            "operationId": "start",
            "security": [{"bearer": []}],
            "responses": api_errors(responses(&[("200", json_response("started (or already running)", schema_ref("ControlAnswer")))]))
        }},
        "/api/messaging/stop": {"post": {
            "summary": "Stop processing on the whole cluster; no new batch starts after this returns",
            "operationId": "stop",
            "security": [{"bearer": []}],
            "responses": api_errors(responses(&[("200", json_response("stopped", schema_ref("ControlAnswer")))]))
        }},
        "/api/messaging/status": {"get": {
            "summary": "Desired state, leader, schedule and live replicas",
            "operationId": "status",
            "security": [{"bearer": []}],
            "responses": api_errors(responses(&[("200", json_response("status", schema_ref("Status")))]))
        }},
        "/api/messaging/config": {"put": {
            "summary": "Change batch size and/or interval for the whole cluster (null clears an override)",
            "operationId": "updateConfig",
            "security": [{"bearer": []}],
            "requestBody": {"required": true, "content": {"application/json": {"schema": schema_ref("ConfigChange")}}},
            "responses": api_errors(responses(&[
                ("200", json_response("the schedule now in force", schema_ref("Schedule"))),
                ("400", error_response("not JSON")),
                ("413", error_response("body over 1 MiB")),
                ("422", error_response("invalid value or unknown field"))
            ]))
        }},
        "/api/lanes": {"get": {
            "summary": "Each lane: leader, schedule, queue, providers",
            "operationId": "lanes",
            "security": [{"bearer": []}],
            "responses": api_errors(responses(&[("200", json_response("the lanes", schema_ref("Lanes")))]))
        }},
        "/api/lanes/{name}/start": {"post": {
            "summary": "Start one lane",
            "operationId": "startLane",
            "security": [{"bearer": []}],
            "parameters": [lane_param.clone()],
            "responses": api_errors(responses(&[
                ("200", json_response("started (or already running)", schema_ref("LaneControlAnswer"))),
                ("404", error_response("no such lane"))
            ]))
        }},
        "/api/lanes/{name}/stop": {"post": {
            "summary": "Stop one lane; no new send of it starts after this returns",
            "operationId": "stopLane",
            "security": [{"bearer": []}],
            "parameters": [lane_param.clone()],
            "responses": api_errors(responses(&[
                ("200", json_response("stopped", schema_ref("LaneControlAnswer"))),
                ("404", error_response("no such lane"))
            ]))
        }},
        "/api/lanes/{name}/config": {"put": {
            "summary": "Change one lane's batch size and/or interval (null clears an override)",
            "operationId": "updateLaneConfig",
            "security": [{"bearer": []}],
            "parameters": [lane_param],
            "requestBody": {"required": true, "content": {"application/json": {"schema": schema_ref("ConfigChange")}}},
            "responses": api_errors(responses(&[
                ("200", json_response("the lane's schedule now in force", schema_ref("Schedule"))),
                ("400", error_response("not JSON")),
                ("404", error_response("no such lane")),
                ("413", error_response("body over 1 MiB")),
                ("422", error_response("invalid value or unknown field"))
            ]))
        }},
        "/api/messages": {
            "get": {
                "summary": "Messages of any status, newest first",
                "operationId": "listMessages",
                "security": [{"bearer": []}],
                "parameters": page_params.as_array().unwrap_or(&Vec::new()).iter().cloned()
                    .chain([
                        json!({"name": "status", "in": "query", "required": false, "description": "empty: any status", "schema": {"enum": STATUSES.iter().copied().chain([""]).collect::<Vec<_>>()}}),
                        json!({"name": "phone_number", "in": "query", "required": false, "description": "the number, in E.164 (or national with DEFAULT_REGION), or exactly as stored", "schema": {"type": "string", "pattern": "^\\+?[0-9]+$", "minLength": 1, "maxLength": 20}}),
                        json!({"name": "since", "in": "query", "required": false, "description": "created_at at or after (RFC 3339)", "schema": {"type": "string", "format": "date-time", "pattern": RFC3339_PATTERN}}),
                        json!({"name": "until", "in": "query", "required": false, "description": "created_at before (RFC 3339)", "schema": {"type": "string", "format": "date-time", "pattern": RFC3339_PATTERN}}),
                        json!({"name": "lane", "in": "query", "required": false, "description": "a configured lane (GET /api/lanes); absent or empty: any", "schema": {"type": "string", "pattern": LANE_PATTERN}})
                    ])
                    .collect::<Vec<_>>(),
                "responses": api_errors(responses(&[
                    ("200", json_response("a page of messages", schema_ref("MessagePage"))),
                    ("400", error_response("bad query parameter"))
                ]))
            },
            "post": {
                "summary": "Create one message or up to 1000 (idempotent with a key)",
                "operationId": "createMessages",
                "security": [{"bearer": []}],
                "parameters": [{"name": "Idempotency-Key", "in": "header", "required": false, "description": "for a single message (an array gives each item its own idempotency_key)", "schema": {"type": "string", "pattern": IDEMPOTENCY_KEY_PATTERN}}],
                "requestBody": {"required": true, "content": {"application/json": {"schema": {"oneOf": [
                    schema_ref("NewMessage"),
                    {"type": "array", "items": schema_ref("NewMessage"), "minItems": 1, "maxItems": 1000}
                ]}}}},
                "responses": api_errors(responses(&[
                    ("201", json_response("created: an object for an object, an array for an array", json!({"oneOf": [
                        schema_ref("Message"),
                        {"type": "array", "items": schema_ref("Message")}
                    ]}))),
                    ("200", json_response("every item repeated an idempotency key: the original messages", json!({"oneOf": [
                        schema_ref("Message"),
                        {"type": "array", "items": schema_ref("Message")}
                    ]}))),
                    ("409", error_response("an idempotency key was used before with a different payload (code idempotency_conflict)")),
                    ("400", error_response("not JSON, or a bad header")),
                    ("413", error_response("body over 1 MiB")),
                    ("422", error_response("a field is invalid; the error names it and its index"))
                ]))
            }
        },
        "/api/messages/sent": {"get": {
            "summary": "Sent messages, newest first, with cached_at from Redis",
            "operationId": "listSent",
            "security": [{"bearer": []}],
            "parameters": page_params,
            "responses": api_errors(responses(&[
                ("200", json_response("a page of sent messages", schema_ref("SentPage"))),
                ("400", error_response("bad query parameter"))
            ]))
        }},
        "/api/messages/{id}": {"get": {
            "summary": "One message",
            "operationId": "getMessage",
            "security": [{"bearer": []}],
            "parameters": [id_param],
            "responses": api_errors(responses(&[
                ("200", json_response("the message", schema_ref("Message"))),
                ("404", error_response("no such message"))
            ]))
        }},
        "/api/messages/stats": {"get": {
            "summary": "Counts by status, scheduled, oldest pending age, recent sends, delivery receipts",
            "operationId": "messageStats",
            "security": [{"bearer": []}],
            "responses": api_errors(responses(&[("200", json_response("the stats", schema_ref("Stats")))]))
        }},
        "/api/messages/activity": {"get": {
            "summary": "Sent, failed and retried per second (cluster-wide, the last hour at most), for the operator console's chart",
            "operationId": "messageActivity",
            "security": [{"bearer": []}],
            "parameters": [{"name": "minutes", "in": "query", "required": false, "schema": {"type": "integer", "minimum": 1, "maximum": 60, "default": 15}}],
            "responses": api_errors(responses(&[
                ("200", json_response("the window and its seconds with activity", schema_ref("Activity"))),
                ("400", error_response("bad query parameter"))
            ]))
        }},
        "/api/messages/{id}/cancel": {"post": {
            "summary": "Cancel a pending message",
            "operationId": "cancelMessage",
            "security": [{"bearer": []}],
            "parameters": [id_param],
            "responses": api_errors(responses(&[
                ("200", json_response("the message, cancelled", schema_ref("Message"))),
                ("404", error_response("no such message")),
                ("409", error_response("the message is not pending"))
            ]))
        }},
        "/api/messages/retry": {"post": {
            "summary": "Retry every failed message the filter selects",
            "operationId": "retryMessages",
            "security": [{"bearer": []}],
            "requestBody": {"required": true, "content": {"application/json": {"schema": schema_ref("RetryFilter")}}},
            "responses": api_errors(responses(&[
                ("200", json_response("how many went back to pending", json!({"type": "object", "required": ["retried"], "properties": {"retried": {"type": "integer"}}}))),
                ("400", error_response("the body is not JSON")),
                ("413", error_response("the body is over 1 MiB")),
                ("422", error_response("status is not failed, or a field is invalid or unknown"))
            ]))
        }},
        "/api/messages/cancel": {"post": {
            "summary": "Cancel every pending message the filter selects",
            "operationId": "cancelMessages",
            "security": [{"bearer": []}],
            "requestBody": {"required": true, "content": {"application/json": {"schema": schema_ref("CancelFilter")}}},
            "responses": api_errors(responses(&[
                ("200", json_response("how many were cancelled", json!({"type": "object", "required": ["cancelled"], "properties": {"cancelled": {"type": "integer"}}}))),
                ("400", error_response("the body is not JSON")),
                ("413", error_response("the body is over 1 MiB")),
                ("422", error_response("status is not pending, or a field is invalid or unknown"))
            ]))
        }},
        "/api/delivery-receipts": {"post": {
            "summary": "Delivery receipts from the provider (one object or up to 1000); DLR_TOKEN when set",
            "operationId": "deliveryReceipts",
            "security": [{"bearer": []}],
            "requestBody": {"required": true, "content": {"application/json": {"schema": {"oneOf": [
                schema_ref("Receipt"),
                {"type": "array", "items": schema_ref("Receipt"), "minItems": 1, "maxItems": 1000}
            ]}}}},
            "responses": api_errors(responses(&[
                ("200", json_response("what became of each receipt: an object for an object, an array for an array", json!({"oneOf": [
                    schema_ref("ReceiptOutcome"),
                    {"type": "array", "items": schema_ref("ReceiptOutcome")}
                ]}))),
                ("400", error_response("not JSON")),
                ("413", error_response("body over 1 MiB")),
                ("422", error_response("a field is invalid or unknown; the error names it and its index"))
            ]))
        }},
        "/api/providers/{name}/receipts": {"post": {
            "summary": "Delivery receipts in a provider's own format: Twilio's status callback (a form, verified with X-Twilio-Signature), Vonage's and Infobip's reports, ours for http-json; the others authenticate with DLR_TOKEN as a Bearer token or ?token=",
            "operationId": "providerReceipts",
            "security": [{"bearer": []}],
            "parameters": [{"name": "name", "in": "path", "required": true, "description": "a configured provider", "schema": {"type": "string", "pattern": PROVIDER_PATTERN}}],
            "requestBody": {"required": true, "content": {
                "application/json": {"schema": {"anyOf": [
                    schema_ref("Receipt"),
                    {"type": "array", "items": schema_ref("Receipt"), "minItems": 1, "maxItems": 1000},
                    {"type": "object", "required": ["results"], "description": "Infobip's delivery report", "properties": {"results": {"type": "array", "items": {"type": "object", "required": ["messageId"], "properties": {"messageId": {"type": "string"}}}}}},
                    {"type": "object", "required": ["messageId"], "description": "Vonage's delivery receipt", "properties": {"messageId": {"type": "string"}, "status": {"type": "string"}, "err-code": {"type": "string"}}}
                ]}},
                "application/x-www-form-urlencoded": {"schema": {"type": "object", "description": "Twilio's status callback (MessageSid, MessageStatus, ErrorCode) or Vonage's receipt", "additionalProperties": {"type": "string"}}}
            }},
            "responses": api_errors(responses(&[
                ("200", json_response("what became of each receipt; intermediate statuses are ignored", json!({"type": "object", "required": ["receipts"], "properties": {"receipts": {"type": "array", "items": {"type": "object", "required": ["outcome"], "properties": {"message_id": {"type": "string"}, "outcome": {"enum": ["applied", "already_delivered", "held", "ignored"]}}}}}}))),
                ("400", error_response("not JSON where the provider's format is JSON")),
                ("403", error_response("a Twilio callback without a valid X-Twilio-Signature")),
                ("404", error_response("no such provider")),
                ("413", error_response("body over 1 MiB")),
                ("422", error_response("not a receipt in the provider's format"))
            ]))
        }},
        "/api/providers/{name}/inbound": {"post": {
            "summary": "Replies from recipients in a provider's own format: STOP, STOPALL, UNSUBSCRIBE, CANCEL, END or QUIT (alone, any case) puts the sender on the opt-out list, START or UNSTOP takes it off; other text changes nothing. Authenticated like receipts (X-Twilio-Signature for Twilio, else DLR_TOKEN as a Bearer token or ?token=)",
            "operationId": "providerInbound",
            "security": [{"bearer": []}],
            "parameters": [{"name": "name", "in": "path", "required": true, "description": "a configured provider", "schema": {"type": "string", "pattern": PROVIDER_PATTERN}}],
            "requestBody": {"required": true, "content": {
                "application/json": {"schema": {"anyOf": [
                    {"type": "object", "additionalProperties": false, "required": ["from", "text"], "description": "http-json", "properties": {"from": {"type": "string", "description": "the sender, E.164"}, "to": {"type": ["string", "null"]}, "text": {"type": "string"}}},
                    {"type": "object", "required": ["results"], "description": "Infobip's received messages", "properties": {"results": {"type": "array", "items": {"type": "object", "required": ["from"], "properties": {"from": {"type": "string"}, "to": {"type": "string"}, "text": {"type": "string"}, "cleanText": {"type": "string"}}}}}},
                    {"type": "object", "required": ["msisdn"], "description": "Vonage's inbound SMS", "properties": {"msisdn": {"type": "string"}, "to": {"type": "string"}, "text": {"type": "string"}}}
                ]}},
                "application/x-www-form-urlencoded": {"schema": {"type": "object", "description": "Twilio's incoming message (From, To, Body) or Vonage's inbound SMS (msisdn, to, text)", "additionalProperties": {"type": "string"}}}
            }},
            "responses": api_errors(responses(&[
                ("200", {
                    let mut answer = json_response("what became of each reply", json!({"type": "object", "required": ["messages"], "properties": {"messages": {"type": "array", "items": {"enum": ["opted_out", "already_opted_out", "opted_in", "not_opted_out", "ignored", "not_a_phone_number"]}}}}));
                    answer["content"]["text/xml"] = json!({"schema": {"type": "string", "description": "to Twilio: empty TwiML, no reply sent"}});
                    answer
                }),
                ("400", error_response("not JSON where the provider's format is JSON")),
                ("403", error_response("a Twilio request without a valid X-Twilio-Signature")),
                ("404", error_response("no such provider")),
                ("413", error_response("body over 1 MiB")),
                ("422", error_response("not an inbound message in the provider's format"))
            ]))
        }},
        "/api/opt-outs": {"get": {
            "summary": "The opt-out list, a page in number order",
            "operationId": "listOptOuts",
            "security": [{"bearer": []}],
            "parameters": [
                {"name": "limit", "in": "query", "required": false, "schema": {"type": "integer", "minimum": 1, "maximum": 1000, "default": 100}},
                {"name": "cursor", "in": "query", "required": false, "description": "next_cursor of the previous page", "schema": {"type": "string", "pattern": "^([+ ]?[0-9]{1,20})?$", "description": "empty: the first page"}}
            ],
            "responses": api_errors(responses(&[
                ("200", json_response("a page of the list", json!({"type": "object", "required": ["opt_outs", "next_cursor"], "properties": {"opt_outs": {"type": "array", "items": schema_ref("OptOut")}, "next_cursor": {"type": ["string", "null"]}}}))),
                ("400", error_response("bad query parameter"))
            ]))
        }},
        "/api/opt-outs/{phone_number}": {
            "get": {
                "summary": "One number's entry on the opt-out list",
                "operationId": "getOptOut",
                "security": [{"bearer": []}],
                "parameters": [phone_param],
                "responses": api_errors(responses(&[
                    ("200", json_response("the entry", schema_ref("OptOut"))),
                    ("404", error_response("the number is not on the list")),
                    ("422", error_response("not a phone number"))
                ]))
            },
            "put": {
                "summary": "Put a number on the opt-out list: no message is sent to it from now on (new messages become blocked at intake, queued ones at their claim)",
                "operationId": "putOptOut",
                "security": [{"bearer": []}],
                "parameters": [phone_param],
                "requestBody": {"required": false, "content": {"application/json": {"schema": {"type": "object", "additionalProperties": false, "properties": {"source": {"type": ["string", "null"], "pattern": "^ *[!-~][ -~]{0,99}$", "maxLength": 100, "description": "who asked; default api"}}}}}},
                "responses": api_errors(responses(&[
                    ("201", json_response("listed", schema_ref("OptOut"))),
                    ("200", json_response("listed already; the first entry is kept", schema_ref("OptOut"))),
                    ("400", error_response("the body is not JSON")),
                    ("413", error_response("the body is over 1 MiB")),
                    ("422", error_response("not a phone number, or a bad source"))
                ]))
            },
            "delete": {
                "summary": "Take a number off the opt-out list (it opted back in)",
                "operationId": "deleteOptOut",
                "security": [{"bearer": []}],
                "parameters": [phone_param],
                "responses": api_errors(responses(&[
                    ("200", json_response("off the list", json!({"type": "object", "required": ["phone_number", "opted_out"], "properties": {"phone_number": {"type": "string"}, "opted_out": {"const": false}}}))),
                    ("404", error_response("the number is not on the list")),
                    ("422", error_response("not a phone number"))
                ]))
            }
        },
        "/api/webhooks/failed": {"get": {
            "summary": "Status webhooks given up on after STATUS_WEBHOOK_RETRY_FOR (dead letters), newest first",
            "operationId": "failedWebhooks",
            "security": [{"bearer": []}],
            "parameters": [
                {"name": "limit", "in": "query", "required": false, "schema": {"type": "integer", "minimum": 1, "maximum": 500, "default": 50}},
                {"name": "cursor", "in": "query", "required": false, "description": "next_cursor of the previous page", "schema": {"type": "integer", "format": "int64", "minimum": 1, "maximum": i64::MAX}}
            ],
            "responses": api_errors(responses(&[
                ("200", json_response("a page of dead letters", json!({"type": "object", "required": ["events", "next_cursor"], "properties": {"events": {"type": "array", "items": schema_ref("WebhookEvent")}, "next_cursor": {"type": ["integer", "null"]}}}))),
                ("400", error_response("bad query parameter"))
            ]))
        }},
        "/api/webhooks/{id}/replay": {"post": {
            "summary": "Post a dead letter again: due now, with the same webhook-id and a fresh retry window",
            "operationId": "replayWebhook",
            "security": [{"bearer": []}],
            "parameters": [id_param],
            "responses": api_errors(responses(&[
                ("200", json_response("the event, pending again", schema_ref("WebhookEvent"))),
                ("404", error_response("no such event")),
                ("409", error_response("the event is not failed"))
            ]))
        }},
        "/api/messages/{id}/retry": {"post": {
            "summary": "Move a failed message back to pending",
            "operationId": "retryMessage",
            "security": [{"bearer": []}],
            "parameters": [id_param],
            "responses": api_errors(responses(&[
                ("200", json_response("the message, pending again", schema_ref("Message"))),
                ("404", error_response("no such message")),
                ("409", error_response("the message is not failed"))
            ]))
        }}
    })
}
