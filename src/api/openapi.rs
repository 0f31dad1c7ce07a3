//! The OpenAPI document (committed as `openapi/openapi.json`; a test fails on drift).

use utoipa::openapi::security::{HttpAuthScheme, HttpBuilder, SecurityScheme};
use utoipa::{Modify, OpenApi};

#[derive(OpenApi)]
#[openapi(
    info(
        title = "fewstep",
        description = "Serve few-step distilled diffusion models. Errors are `application/problem+json` with a stable `code`.",
        license(name = "Apache-2.0")
    ),
    paths(
        super::generate::generate,
        super::jobs::job,
        super::jobs::cancel,
        super::jobs::events,
        super::info::models,
        super::openai::images::generate,
        super::openai::models::list,
        super::openai::models::retrieve,
        super::openai::videos::create,
        super::openai::videos::list,
        super::openai::videos::retrieve,
        super::openai::videos::delete,
        super::openai::videos::content,
        super::info::health,
        super::info::ready,
        super::info::metrics,
        super::feedback::feedback,
        super::feedback::generation,
        super::admin::reload,
        super::admin::rollout,
        super::admin::promote,
        super::admin::rollback,
        super::admin::queue,
    ),
    components(schemas(
        super::schema::GenerateRequest,
        super::schema::GenerateResponse,
        super::schema::GeneratedOutput,
        super::schema::StageTimings,
        super::schema::ModelInfo,
        super::schema::ModelList,
        super::schema::Size,
        super::schema::Status,
        super::schema::JobStatus,
        super::schema::JobFailure,
        crate::engine::JobState,
        crate::engine::Stage,
        super::error::Problem,
        super::schema::Media,
        super::openai::OpenAiErrorBody,
        super::openai::OpenAiErrorDetail,
        super::openai::images::ImageGenerationRequest,
        super::openai::images::ImagesResponse,
        super::openai::images::OpenAiImage,
        super::openai::models::OpenAiModel,
        super::openai::models::OpenAiModelList,
        super::openai::videos::VideoCreateRequest,
        super::openai::videos::Video,
        super::openai::videos::VideoError,
        super::openai::videos::VideoList,
        super::openai::videos::VideoDeleted,
        super::feedback::FeedbackRequest,
        super::feedback::Feedback,
        super::feedback::Generation,
        super::feedback::Thumbs,
        super::admin::ReloadRequest,
        super::admin::ReloadResponse,
        super::admin::RolloutEndResponse,
        crate::rollout::RolloutReport,
        crate::rollout::ArmReport,
        crate::rollout::DecisionView,
        crate::rollout::RolloutPolicy,
        crate::rollout::Verdict,
        crate::rollout::Action,
        super::admin::QueueState,
        crate::media::OutputFormat,
    )),
    modifiers(&BearerAuth),
    tags(
        (name = "generation", description = "Text to image and video"),
        (name = "jobs", description = "Asynchronous generations: state, progress events, cancel"),
        (name = "models", description = "What the server runs"),
        (name = "openai", description = "OpenAI-compatible images, videos and models under `/v1` (errors in OpenAI's shape)"),
        (name = "feedback", description = "The generation log and user ratings"),
        (name = "admin", description = "Hot reload and queue state (admin token)"),
        (name = "operations", description = "Probes and metrics (never need a key)"),
    )
)]
pub struct ApiDoc;

struct BearerAuth;

impl Modify for BearerAuth {
    fn modify(&self, openapi: &mut utoipa::openapi::OpenApi) {
        let components = openapi.components.get_or_insert_with(Default::default);
        components.add_security_scheme(
            "bearer",
            SecurityScheme::Http(HttpBuilder::new().scheme(HttpAuthScheme::Bearer).build()),
        );
        components.add_security_scheme(
            "admin",
            SecurityScheme::Http(
                HttpBuilder::new()
                    .scheme(HttpAuthScheme::Bearer)
                    .description(Some("The server's `admin_token`"))
                    .build(),
            ),
        );
    }
}

/// The spec as pretty JSON, exactly what `fewstep openapi` prints.
pub fn spec_json() -> String {
    ApiDoc::openapi()
        .to_pretty_json()
        .expect("the OpenAPI document serializes")
}
