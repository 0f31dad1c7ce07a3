//! `GET /v1/models` and `GET /v1/models/{id}` in OpenAI's list/object shape, each model with
//! the native capability fields beside OpenAI's four.

use axum::extract::{Path, State};
use axum::Json;
use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

use super::{OpenAiError, OpenAiErrorBody};
use crate::api::error::ServeError;
use crate::api::info::model_info;
use crate::api::schema::ModelInfo;
use crate::api::AppState;
use crate::engine::ModelCard;

/// OpenAI's `Model` (its `id` comes with the capability fields), with what the model can do.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct OpenAiModel {
    /// Always `model`.
    pub object: String,
    /// Unix seconds when the served version was loaded.
    pub created: u64,
    pub owned_by: String,
    /// The native capability fields (`GET /models`).
    #[serde(flatten)]
    pub info: ModelInfo,
}

#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct OpenAiModelList {
    /// Always `list`.
    pub object: String,
    pub data: Vec<OpenAiModel>,
}

fn model(card: &ModelCard) -> OpenAiModel {
    let info = model_info(card);
    OpenAiModel {
        object: "model".into(),
        created: card.created,
        owned_by: "fewstep".into(),
        info,
    }
}

/// The loaded models (OpenAI's `models.list`).
#[utoipa::path(get, path = "/v1/models", tag = "openai", operation_id = "models_list",
    responses(
        (status = 200, description = "Loaded models", body = OpenAiModelList),
        (status = 401, description = "Missing or wrong API key", body = OpenAiErrorBody),
    ),
    security((), ("bearer" = [])))]
pub async fn list(State(state): State<AppState>) -> Json<OpenAiModelList> {
    Json(OpenAiModelList {
        object: "list".into(),
        data: state.engine.cards().iter().map(model).collect(),
    })
}

/// One model (OpenAI's `models.retrieve`).
#[utoipa::path(get, path = "/v1/models/{id}", tag = "openai", operation_id = "models_retrieve",
    params(("id" = String, Path, description = "Model id")),
    responses(
        (status = 200, description = "The model", body = OpenAiModel),
        (status = 404, description = "No such model", body = OpenAiErrorBody),
    ),
    security((), ("bearer" = [])))]
pub async fn retrieve(
    State(state): State<AppState>,
    Path(id): Path<String>,
) -> Result<Json<OpenAiModel>, OpenAiError> {
    let card = state.engine.card(&id).ok_or_else(|| OpenAiError {
        api: ServeError::UnknownModel(id.clone()).into(),
        param: Some("model".into()),
    })?;
    Ok(Json(model(&card)))
}
