//! The parts of the OpenAPI document that the derive macros cannot say by themselves: the
//! shape of ids, answers with 201/202, and how a caller authenticates.
//!
//! The document is a contract that tests/every_route.rs holds the server to: every status a
//! route answers in its sweep must be declared for that route. So a handler's `#[endpoint]`
//! names its statuses (`status_codes(...)`), [`super::ApiError`] describes every error status
//! it can take, and [`Created`] / [`Accepted`] carry their status in the type instead of a
//! `res.status_code(...)` the document would not see.

use salvo::http::StatusCode;
use salvo::oapi::security::{ApiKey, ApiKeyValue, Http, HttpAuthScheme, SecurityScheme};
use salvo::oapi::{
    self, BasicType, Components, EndpointOutRegister, Object, OpenApi, Operation, RefOr, ToSchema,
};
use salvo::prelude::*;
use serde::Serialize;

use crate::ids::MAX_ID_LEN;

/// Name of the bearer security scheme (local API tokens and Better Auth session tokens).
pub const BEARER: &str = "bearer";
/// Name of the session cookie security scheme (Better Auth).
pub const SESSION_COOKIE: &str = "sessionCookie";

/// What `crate::ids::is_valid_id` accepts, as a JSON Schema pattern.
pub const ID_PATTERN: &str = "^[A-Za-z0-9_-]{1,64}$";

/// What `crate::ids::parse_version_id` accepts: a positive decimal of at most 19 digits.
pub const VERSION_ID_PATTERN: &str = "^0*[1-9][0-9]*$";
const VERSION_ID_MAX_LEN: usize = 19;

/// A project, branch or workflow id: the only ids the server accepts (they name directories
/// and keys, so nothing else gets in). Documented as the `Id` schema.
pub struct Id;

impl ToSchema for Id {
    fn to_schema(components: &mut Components) -> RefOr<oapi::Schema> {
        let schema = Object::with_type(BasicType::String)
            .pattern(ID_PATTERN)
            .min_length(1)
            .max_length(MAX_ID_LEN)
            .description("1-64 characters of A-Z, a-z, 0-9, `_` or `-`.");
        named(components, "Id", schema)
    }
}

/// A version id: the decimal per-branch sequence number, from 1. Documented as `VersionId`.
pub struct VersionId;

impl ToSchema for VersionId {
    fn to_schema(components: &mut Components) -> RefOr<oapi::Schema> {
        let schema = Object::with_type(BasicType::String)
            .pattern(VERSION_ID_PATTERN)
            .min_length(1)
            .max_length(VERSION_ID_MAX_LEN)
            .description("The version's sequence number in its branch (1 is the initial commit).");
        named(components, "VersionId", schema)
    }
}

fn named(components: &mut Components, name: &str, schema: Object) -> RefOr<oapi::Schema> {
    components.schemas.insert(name.to_string(), schema);
    RefOr::Ref(oapi::Ref::new(format!("#/components/schemas/{name}")))
}

/// A JSON answer with `201 Created`.
pub struct Created<T>(pub T);

/// A JSON answer with `202 Accepted`: the work goes on after the answer.
pub struct Accepted<T>(pub T);

impl<T: Serialize + Send> Scribe for Created<T> {
    fn render(self, res: &mut Response) {
        res.status_code(StatusCode::CREATED);
        res.render(Json(self.0));
    }
}

impl<T: Serialize + Send> Scribe for Accepted<T> {
    fn render(self, res: &mut Response) {
        res.status_code(StatusCode::ACCEPTED);
        res.render(Json(self.0));
    }
}

impl<T: ToSchema> EndpointOutRegister for Created<T> {
    fn register(components: &mut Components, operation: &mut Operation) {
        let schema = T::to_schema(components);
        operation.responses.insert(
            "201",
            oapi::Response::new("Created").add_content("application/json", schema),
        );
    }
}

impl<T: ToSchema> EndpointOutRegister for Accepted<T> {
    fn register(components: &mut Components, operation: &mut Operation) {
        let schema = T::to_schema(components);
        operation.responses.insert(
            "202",
            oapi::Response::new("Accepted; the work goes on (follow it on the branch stream)")
                .add_content("application/json", schema),
        );
    }
}

/// Add the security schemes that `security(...)` in the endpoints refer to. The session
/// cookie's name depends on `AUTH_COOKIE_PREFIX`.
pub fn with_security_schemes(mut doc: OpenApi, cookie_prefix: &str) -> OpenApi {
    let bearer = Http::new(HttpAuthScheme::Bearer).description(
        "A local API token (`weldr-agent token create`; the server prints one at its first \
         start), or a signed Better Auth session token.",
    );
    let cookie = ApiKey::Cookie(ApiKeyValue::with_description(
        format!("{cookie_prefix}.session_token"),
        format!(
            "The signed Better Auth session cookie `{cookie_prefix}.session_token` \
             (`__Secure-{cookie_prefix}.session_token` over HTTPS; the prefix is \
             AUTH_COOKIE_PREFIX). Needs BETTER_AUTH_SECRET on the server."
        ),
    ));
    doc.components
        .security_schemes
        .insert(BEARER.into(), RefOr::Type(SecurityScheme::Http(bearer)));
    doc.components
        .security_schemes
        .insert(SESSION_COOKIE.into(), RefOr::Type(cookie.into()));
    doc
}
