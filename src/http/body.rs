//! Request bodies: `Content-Type: application/json` (415 otherwise), at most 1 MiB
//! (with or without Content-Length), parsed with serde into typed structs that refuse
//! unknown and repeated fields. A syntax error is a 400; a value serde refuses (a typo
//! in a field name, a wrong type, a missing field) a 422 naming the field and, in an
//! array, the item's index.

use bytes::{Buf, Bytes};
use futures::StreamExt;
use serde::de::DeserializeOwned;
use warp::Filter;

use super::ApiError;

pub const MAX_BODY: usize = 1 << 20;

/// How long a body may take to arrive: a client trickling one byte at a time must not
/// hold its connection (and a slot under the connection cap) for longer.
const BODY_READ_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(10);

/// The raw body of a JSON request. Rejects with 415 when the content type is not JSON,
/// 413 over the limit.
pub fn json_bytes() -> impl Filter<Extract = (Bytes,), Error = warp::Rejection> + Clone {
    warp::header::optional::<String>("content-type")
        .and_then(|content_type: Option<String>| async move {
            if !content_type.as_deref().is_some_and(is_json) {
                return Err(warp::reject::custom(ApiError::UnsupportedMediaType));
            }
            Ok(())
        })
        .untuple_one()
        .and(any_bytes())
}

/// The raw body, whatever its type (a provider's form or JSON callback), empty when
/// there is none; 413 over the limit.
pub fn any_bytes() -> impl Filter<Extract = (Bytes,), Error = warp::Rejection> + Clone {
    warp::header::optional::<u64>("content-length")
        .and_then(|length: Option<u64>| async move {
            match length {
                Some(n) if n > MAX_BODY as u64 => {
                    Err(warp::reject::custom(ApiError::PayloadTooLarge))
                }
                _ => Ok(()),
            }
        })
        .untuple_one()
        .and(warp::body::stream())
        .and_then(|stream| async move {
            match tokio::time::timeout(BODY_READ_TIMEOUT, read_limited(stream)).await {
                Ok(read) => read.map(Bytes::from).map_err(warp::reject::custom),
                Err(_) => Err(warp::reject::custom(ApiError::RequestTimeout)),
            }
        })
}

/// `application/json` or `application/<anything>+json`, with any parameters.
pub fn is_json(content_type: &str) -> bool {
    let essence = content_type
        .split(';')
        .next()
        .unwrap_or_default()
        .trim()
        .to_ascii_lowercase();
    essence == "application/json"
        || essence
            .strip_prefix("application/")
            .is_some_and(|sub| sub.ends_with("+json"))
}

async fn read_limited<S, B>(stream: S) -> Result<Vec<u8>, ApiError>
where
    S: futures::Stream<Item = Result<B, warp::Error>>,
    B: Buf,
{
    let mut stream = std::pin::pin!(stream);
    let mut body = Vec::new();
    while let Some(chunk) = stream.next().await {
        let mut chunk = chunk
            .map_err(|err| ApiError::bad_request(format!("could not read the body: {err}")))?;
        if body.len() + chunk.remaining() > MAX_BODY {
            return Err(ApiError::PayloadTooLarge);
        }
        while chunk.has_remaining() {
            let part = chunk.chunk();
            body.extend_from_slice(part);
            let n = part.len();
            chunk.advance(n);
        }
    }
    Ok(body)
}

/// The body as one `T`, a JSON object.
pub fn parse<T: DeserializeOwned>(bytes: &[u8]) -> Result<T, ApiError> {
    match objects(bytes)? {
        Shape::Object => typed(bytes),
        _ => Err(ApiError::validation("body", "expected a JSON object")),
    }
}

/// What a body holds, at the top. serde reads a struct from a JSON array as readily as
/// from an object (`[null, null]` is a struct of two fields), so the shape is checked
/// before the body is read into its type.
enum Shape {
    Object,
    /// An array of objects only.
    Objects,
    /// An array with something else than an object at this index.
    NotObjectAt(usize),
    Other,
}

fn objects(bytes: &[u8]) -> Result<Shape, ApiError> {
    if bytes.iter().all(u8::is_ascii_whitespace) {
        return Err(ApiError::BadRequest {
            code: "invalid_json",
            message: "the request body is empty; expected JSON".into(),
        });
    }
    let value: serde_json::Value =
        serde_json::from_slice(bytes).map_err(|err| ApiError::BadRequest {
            code: "invalid_json",
            message: format!("the request body is not valid JSON: {err}"),
        })?;
    Ok(match value {
        serde_json::Value::Object(_) => Shape::Object,
        serde_json::Value::Array(items) => items
            .iter()
            .position(|item| !item.is_object())
            .map_or(Shape::Objects, Shape::NotObjectAt),
        _ => Shape::Other,
    })
}

/// The body read into `T`, with serde's errors as the API's.
fn typed<T: DeserializeOwned>(bytes: &[u8]) -> Result<T, ApiError> {
    let mut deserializer = serde_json::Deserializer::from_slice(bytes);
    let value = serde_path_to_error::deserialize(&mut deserializer).map_err(refused)?;
    deserializer.end().map_err(|err| ApiError::BadRequest {
        code: "invalid_json",
        message: format!("the request body is not valid JSON: {err}"),
    })?;
    Ok(value)
}

/// A body that is one object or an array of 1 to `max` objects. Returns the items and
/// whether it was a single object (the answer mirrors the input).
pub fn one_or_many<T: DeserializeOwned>(
    bytes: &[u8],
    max: usize,
    noun: &str,
) -> Result<(Vec<T>, bool), ApiError> {
    let (items, single) = match objects(bytes)? {
        Shape::Objects => (typed::<Vec<T>>(bytes)?, false),
        Shape::Object => (vec![typed::<T>(bytes)?], true),
        Shape::NotObjectAt(index) => {
            return Err(
                ApiError::validation("body", format!("each {noun} must be an object"))
                    .at_index(index),
            );
        }
        Shape::Other => {
            return Err(ApiError::validation(
                "body",
                format!("expected a {noun} object or an array of {noun} objects"),
            ));
        }
    };
    if items.is_empty() || items.len() > max {
        return Err(ApiError::validation(
            "body",
            format!("{} {noun}s in one request; send 1 to {max}", items.len()),
        ));
    }
    Ok((items, single))
}

/// A serde error as the API's error: a 400 for malformed JSON, else a 422 naming the
/// field (a path such as `send_at`, or the field serde names for an unknown, repeated
/// or missing one) and the array index.
fn refused(err: serde_path_to_error::Error<serde_json::Error>) -> ApiError {
    use serde_json::error::Category;
    let path = err.path().clone();
    let inner = err.into_inner();
    if !matches!(inner.classify(), Category::Data) {
        return ApiError::BadRequest {
            code: "invalid_json",
            message: format!("the request body is not valid JSON: {inner}"),
        };
    }
    let mut index = None;
    let mut fields: Vec<String> = Vec::new();
    for segment in path.iter() {
        match segment {
            serde_path_to_error::Segment::Seq { index: i }
                if index.is_none() && fields.is_empty() =>
            {
                index = Some(*i);
            }
            serde_path_to_error::Segment::Seq { index: i } => fields.push(format!("[{i}]")),
            serde_path_to_error::Segment::Map { key } => fields.push(key.clone()),
            _ => {}
        }
    }
    let message = inner.to_string();
    // "unknown field `sendAt`, expected …", "missing field `content`": serde names
    // the field in the message, where the path may stop at its object.
    let named = ["unknown field `", "duplicate field `", "missing field `"]
        .iter()
        .find_map(|prefix| message.strip_prefix(prefix))
        .and_then(|rest| rest.split('`').next())
        .map(str::to_string);
    if let Some(name) = named {
        if fields.last() != Some(&name) {
            fields.push(name);
        }
    }
    let field = if fields.is_empty() {
        "body".to_string()
    } else {
        fields.join(".")
    };
    // serde's own wording keeps a "line 1 column 42" suffix; the field says where.
    let message = message
        .rsplit_once(" at line ")
        .map_or(message.as_str(), |(text, _)| text)
        .to_string();
    let error = ApiError::validation(field.clone(), format!("{field}: {message}"));
    match index {
        Some(index) => error.at_index(index),
        None => error,
    }
}

#[cfg(test)]
mod tests {
    use serde::Deserialize;

    use super::*;

    #[derive(Debug, Deserialize)]
    #[serde(deny_unknown_fields)]
    #[allow(dead_code)]
    struct Item {
        phone_number: String,
        #[serde(default)]
        send_at: Option<String>,
        #[serde(default)]
        priority: Option<i64>,
    }

    fn located(err: ApiError) -> (Option<String>, Option<usize>, String) {
        match err {
            ApiError::Validation {
                field,
                index,
                message,
            } => (field, index, message),
            other => panic!("not a validation error: {other:?}"),
        }
    }

    #[test]
    fn typos_repeats_and_wrong_types_name_the_field_and_index() {
        let refused =
            |body: &str| located(one_or_many::<Item>(body.as_bytes(), 10, "message").unwrap_err());
        let (field, index, message) = refused(r#"{"phone_number": "+1", "sendAt": "x"}"#);
        assert_eq!(
            (field.as_deref(), index),
            (Some("sendAt"), None),
            "{message}"
        );
        let (field, index, message) =
            refused(r#"[{"phone_number": "+1"}, {"phone_number": "+1", "expire_at": "x"}]"#);
        assert_eq!(
            (field.as_deref(), index),
            (Some("expire_at"), Some(1)),
            "{message}"
        );
        assert!(
            message.starts_with("[1] expire_at: unknown field"),
            "{message}"
        );
        let (field, _, message) = refused(r#"{"phone_number": "+1", "phone_number": "+2"}"#);
        assert_eq!(field.as_deref(), Some("phone_number"), "{message}");
        assert!(message.contains("duplicate field"), "{message}");
        let (field, index, _) = refused(r#"[{"phone_number": "+1", "priority": "3"}]"#);
        assert_eq!((field.as_deref(), index), (Some("priority"), Some(0)));
        let (field, _, _) = refused(r#"{"send_at": "x"}"#);
        assert_eq!(field.as_deref(), Some("phone_number"));
        let (field, _, _) = refused("[]");
        assert_eq!(field.as_deref(), Some("body"));
        let (field, _, _) = refused("42");
        assert_eq!(field.as_deref(), Some("body"));
        // A struct is not read from an array (serde would).
        let (field, index, _) = refused(r#"[["+1", null, 3]]"#);
        assert_eq!((field.as_deref(), index), (Some("body"), Some(0)));
        let (field, index, _) = refused(r#"[{"phone_number": "+1"}, 7]"#);
        assert_eq!((field.as_deref(), index), (Some("body"), Some(1)));
        let err = parse::<Item>(br#"["+1", null, null]"#).unwrap_err();
        assert_eq!(located(err).0.as_deref(), Some("body"));
    }

    #[test]
    fn malformed_json_is_a_bad_request() {
        for body in ["", "  ", "{", r#"{"phone_number": "+1"} x"#, "nope"] {
            let err = one_or_many::<Item>(body.as_bytes(), 10, "message").unwrap_err();
            assert!(
                matches!(
                    err,
                    ApiError::BadRequest {
                        code: "invalid_json",
                        ..
                    }
                ),
                "{body:?}: {err:?}"
            );
        }
    }

    #[test]
    fn json_content_types() {
        for json in [
            "application/json",
            "Application/JSON; charset=utf-8",
            "application/merge-patch+json",
        ] {
            assert!(is_json(json), "{json}");
        }
        for other in [
            "text/plain",
            "application/x-www-form-urlencoded",
            "multipart/form-data; boundary=x",
            "application/jsonx",
            "",
        ] {
            assert!(!is_json(other), "{other}");
        }
    }
}
