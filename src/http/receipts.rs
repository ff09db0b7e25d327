//! `POST /api/delivery-receipts`: the provider reports what became of accepted
//! messages (see `store::receipts` for how early and repeated receipts are handled).
//!
//! Authentication: `DLR_TOKEN` as a Bearer token when it is set (so the provider's
//! callback never holds the operators' `API_TOKEN`), otherwise the `API_TOKEN` rule.

use serde::Serialize;
use serde_json::Value;
use warp::Filter;
use warp::filters::BoxedFilter;
use warp::http::StatusCode;
use warp::reply::Response;

use super::{ApiError, State, bearer_required, body, json, respond, with_state};
use crate::domain::DeliveryStatus;
use crate::store::receipts::{Receipt, ReceiptOutcome};

/// Most receipts one request may carry.
const MAX_RECEIPTS: usize = 1000;
/// Longest provider id or error code kept.
const MAX_TEXT: usize = 255;
const FIELDS: [&str; 4] = ["message_id", "status", "error_code", "delivered_at"];

pub fn routes(state: State) -> BoxedFilter<(Response,)> {
    warp::path!("delivery-receipts")
        .and(warp::post())
        .and(authorized(state.clone()))
        .and(with_state(state))
        .and(body::json_value())
        .then(|state: State, body: Value| async move { respond(receive(state, body)).await })
        .boxed()
}

/// `DLR_TOKEN` when set, else `API_TOKEN` when set, else open.
fn authorized(state: State) -> impl Filter<Extract = (), Error = warp::Rejection> + Clone {
    bearer_required(state, |config| {
        config.dlr_token.as_ref().or(config.api_token.as_ref())
    })
}

#[derive(Serialize)]
struct Answer<'a> {
    message_id: &'a str,
    outcome: ReceiptOutcome,
}

async fn receive(state: State, body: Value) -> Result<Response, ApiError> {
    let (receipts, single) = body::one_or_many(body, MAX_RECEIPTS, "receipt", parse_receipt)?;
    let mut outcomes = Vec::with_capacity(receipts.len());
    for receipt in &receipts {
        let outcome = state.store.record_receipt(receipt).await?;
        state
            .metrics
            .delivery_receipts
            .with_label_values(&[receipt.status.as_str()])
            .inc();
        tracing::debug!(provider_message_id = %receipt.provider_message_id, status = receipt.status.as_str(), ?outcome, "delivery receipt");
        outcomes.push(outcome);
    }
    let answers: Vec<Answer> = receipts
        .iter()
        .zip(outcomes)
        .map(|(r, outcome)| Answer {
            message_id: &r.provider_message_id,
            outcome,
        })
        .collect();
    if single {
        Ok(json(StatusCode::OK, &answers[0]))
    } else {
        Ok(json(StatusCode::OK, &answers))
    }
}

fn parse_receipt(item: &Value) -> Result<Receipt, ApiError> {
    let Value::Object(fields) = item else {
        return Err(ApiError::validation(
            "body",
            "each receipt must be an object",
        ));
    };
    if let Some(unknown) = fields.keys().find(|k| !FIELDS.contains(&k.as_str())) {
        return Err(ApiError::validation(
            unknown.clone(),
            format!(
                "unknown field {unknown:?}; a receipt has {}",
                FIELDS.join(", ")
            ),
        ));
    }
    let text = |name: &'static str, required: bool| -> Result<Option<String>, ApiError> {
        match fields.get(name) {
            None | Some(Value::Null) if required => {
                Err(ApiError::validation(name, format!("{name} is required")))
            }
            None | Some(Value::Null) => Ok(None),
            Some(Value::String(s)) if (1..=MAX_TEXT).contains(&s.len()) && !s.contains('\0') => {
                Ok(Some(s.clone()))
            }
            Some(_) => Err(ApiError::validation(
                name,
                format!("{name} must be a string of 1 to {MAX_TEXT} bytes"),
            )),
        }
    };
    let provider_message_id = text("message_id", true)?.unwrap_or_default();
    let status_text = text("status", true)?.unwrap_or_default();
    let status = DeliveryStatus::parse(&status_text).ok_or_else(|| {
        ApiError::validation(
            "status",
            format!("status must be delivered, undelivered or failed (got {status_text:?})"),
        )
    })?;
    let delivered_at = text("delivered_at", false)?
        .map(|t| {
            crate::domain::parse_time("delivered_at", &t)
                .map_err(|err| ApiError::validation(err.field, err.to_string()))
        })
        .transpose()?;
    Ok(Receipt {
        provider_message_id,
        status,
        error_code: text("error_code", false)?,
        delivered_at,
    })
}
