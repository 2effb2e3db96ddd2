//! `/projects/{projectId}/attachments`: upload a file a message will refer to, and read it
//! back.
//!
//! What is accepted is decided here, once, for uploads and for the inline parts of a
//! `/trigger` message alike ([`check_content`]): images (PNG, JPEG, GIF, WebP) whose bytes
//! start with their format's magic number, and text-like files that are valid UTF-8; anything
//! else is refused (415) rather than stored and later sent to a model that cannot read it.
//! Storage is content-addressed (see `weldr_storage::attachments`): the same bytes get the
//! same id, and uploading them again answers 200 with the stored record instead of 201.

use base64::Engine;
use base64::engine::{DecodePaddingMode, GeneralPurpose, GeneralPurposeConfig};
use salvo::http::{HeaderValue, ParseError, StatusCode};
use salvo::oapi::{
    self, BasicType, Components, Content, EndpointArgRegister, EndpointOutRegister, KnownFormat,
    Object, Operation, RequestBody, Required, SchemaFormat, ToSchema,
};
use salvo::prelude::*;
use serde::Serialize;
use weldr_storage::attachments::{self as atts, AttachmentRecord, NewAttachment};
use weldr_storage::conversation::AttachmentRef;

use super::{ApiError, principal, require_project};
use crate::app::App;
use crate::ids::check_id;

/// Images a model can be shown, with the magic number their bytes start with.
pub const IMAGE_TYPES: [&str; 4] = ["image/png", "image/jpeg", "image/gif", "image/webp"];

/// Media types outside `text/*` that are text (and so must be UTF-8).
pub const TEXT_TYPES: [&str; 6] = [
    "application/json",
    "application/xml",
    "application/yaml",
    "application/x-yaml",
    "application/javascript",
    "application/typescript",
];

/// Most attachments one message may carry (inline parts and `attachmentIds` together).
pub const MAX_PER_MESSAGE: usize = 20;

/// Longest filename kept, in bytes.
pub const MAX_FILENAME_BYTES: usize = 255;

/// What a multipart body may add to the file it carries (boundaries, part headers).
const MULTIPART_OVERHEAD: usize = 64 * 1024;

/// The essence of a `Content-Type` value (`type/subtype`, no parameters), lowercase; None
/// when it is not one.
pub fn essence(content_type: &str) -> Option<String> {
    let essence = content_type
        .split(';')
        .next()
        .unwrap_or_default()
        .trim()
        .to_ascii_lowercase();
    let (kind, sub) = essence.split_once('/')?;
    let token = |s: &str| {
        !s.is_empty()
            && s.len() <= 127
            && s.bytes()
                .all(|b| b.is_ascii_alphanumeric() || b"!#$&-^_.+".contains(&b))
    };
    (token(kind) && token(sub)).then_some(essence)
}

pub fn is_image(media_type: &str) -> bool {
    IMAGE_TYPES.contains(&media_type)
}

fn is_text(media_type: &str) -> bool {
    media_type.starts_with("text/") || TEXT_TYPES.contains(&media_type)
}

fn unsupported(media_type: &str) -> ApiError {
    ApiError::new(
        StatusCode::UNSUPPORTED_MEDIA_TYPE,
        "unsupported_media_type",
        format!(
            "attachments of type {media_type:?} are not accepted; send an image ({}) or a \
             UTF-8 text file (text/*, {})",
            IMAGE_TYPES.join(", "),
            TEXT_TYPES.join(", ")
        ),
    )
}

fn untyped(what: &str) -> ApiError {
    ApiError::new(
        StatusCode::UNSUPPORTED_MEDIA_TYPE,
        "unsupported_media_type",
        format!(
            "{what} has no Content-Type; send the file's media type (image/png, text/plain, ...)"
        ),
    )
}

pub fn too_large(max: usize) -> ApiError {
    ApiError::new(
        StatusCode::PAYLOAD_TOO_LARGE,
        "attachment_too_large",
        format!("an attachment may be at most {max} bytes (ATTACHMENT_MAX_BYTES)"),
    )
}

/// Whether `bytes` may be stored as `media_type` (an essence): 415 for a type that is not
/// accepted, 413 beyond `max` bytes, 400 when empty, when an image's bytes are not that
/// image format, or when a text is not UTF-8.
pub fn check_content(media_type: &str, bytes: &[u8], max: usize) -> Result<(), ApiError> {
    if !is_image(media_type) && !is_text(media_type) {
        return Err(unsupported(media_type));
    }
    if bytes.len() > max {
        return Err(too_large(max));
    }
    if bytes.is_empty() {
        return Err(ApiError::bad_request(
            "empty_attachment",
            "the attachment is empty",
        ));
    }
    if is_image(media_type) {
        let magic = match media_type {
            "image/png" => bytes.starts_with(b"\x89PNG\r\n\x1a\n"),
            "image/jpeg" => bytes.starts_with(b"\xff\xd8\xff"),
            "image/gif" => bytes.starts_with(b"GIF87a") || bytes.starts_with(b"GIF89a"),
            _ => bytes.len() >= 12 && &bytes[..4] == b"RIFF" && &bytes[8..12] == b"WEBP",
        };
        if !magic {
            return Err(ApiError::bad_request(
                "attachment_type_mismatch",
                format!(
                    "the bytes are not {media_type} (they do not start with its magic number); \
                     send the attachment's real media type"
                ),
            ));
        }
    } else if std::str::from_utf8(bytes).is_err() {
        return Err(ApiError::bad_request(
            "attachment_not_utf8",
            format!("a {media_type} attachment must be UTF-8 text"),
        ));
    }
    Ok(())
}

/// A filename as the caller sent it, if it can be kept: at most 255 bytes, no control
/// characters, no path separators.
pub fn check_filename(name: &str) -> Result<String, ApiError> {
    if name.is_empty()
        || name.len() > MAX_FILENAME_BYTES
        || name
            .chars()
            .any(|c| c.is_control() || c == '/' || c == '\\')
    {
        return Err(ApiError::bad_request(
            "invalid_filename",
            format!(
                "a filename is 1-{MAX_FILENAME_BYTES} bytes without control characters or path \
                 separators"
            ),
        ));
    }
    Ok(name.to_string())
}

/// Bytes sent inline (a data URL or bare base64), decoded, with their media type: the data
/// URL's, or `declared` (which must agree with a data URL's). `field` names the value in
/// errors. Not checked against [`check_content`] yet.
pub fn decode_inline(
    field: &str,
    value: &str,
    declared: Option<&str>,
    max: usize,
) -> Result<(String, Vec<u8>), ApiError> {
    let invalid = |message: String| ApiError::bad_request("invalid_message", message);
    let declared = declared
        .map(|d| {
            essence(d)
                .ok_or_else(|| invalid(format!("{field}: mediaType {d:?} is not a media type")))
        })
        .transpose()?;
    let (from_url, data) = match value.get(..5) {
        Some(scheme) if scheme.eq_ignore_ascii_case("data:") => {
            let (head, data) = value[5..].split_once(',').ok_or_else(|| {
                invalid(format!("{field}: a data URL needs a `,` before its data"))
            })?;
            let mut params = head.split(';');
            let media = params.next().unwrap_or_default();
            if !params.any(|p| p.trim().eq_ignore_ascii_case("base64")) {
                return Err(invalid(format!(
                    "{field}: only base64 data URLs are accepted (`data:<type>;base64,...`)"
                )));
            }
            let media = essence(media)
                .ok_or_else(|| invalid(format!("{field}: the data URL names no media type")))?;
            (Some(media), data)
        }
        _ => (None, value),
    };
    let media_type = match (from_url, declared) {
        (Some(a), Some(b)) if a != b => {
            return Err(invalid(format!(
                "{field}: the data URL says {a} but mediaType says {b}"
            )));
        }
        (Some(a), _) => a,
        (None, Some(b)) => b,
        (None, None) => {
            return Err(invalid(format!(
                "{field}: bare base64 needs a mediaType (or send a data URL)"
            )));
        }
    };
    let compact: Vec<u8> = data.bytes().filter(|b| !b.is_ascii_whitespace()).collect();
    // Refused before decoding: the decoded size is within 2 bytes of 3/4 of the text's.
    if compact.len() / 4 * 3 > max.saturating_add(3) {
        return Err(too_large(max));
    }
    let lenient =
        GeneralPurposeConfig::new().with_decode_padding_mode(DecodePaddingMode::Indifferent);
    let bytes = GeneralPurpose::new(&base64::alphabet::STANDARD, lenient)
        .decode(&compact)
        .or_else(|_| GeneralPurpose::new(&base64::alphabet::URL_SAFE, lenient).decode(&compact))
        .map_err(|e| invalid(format!("{field}: not valid base64 ({e})")))?;
    Ok((media_type, bytes))
}

/// Store an attachment of `project_id` (whose access the caller checked) after
/// [`check_content`]; answers the record and whether it is new.
pub async fn store(app: &App, new: NewAttachment) -> Result<(AttachmentRecord, bool), ApiError> {
    check_content(&new.media_type, &new.bytes, app.config.attachment_max_bytes)?;
    let project = new.project_id.clone();
    app.store
        .writer()
        .write(move |ctx| atts::put(ctx, &new, weldr_storage::writer::now_ms()))
        .await
        .map_err(|e| match e {
            weldr_storage::StorageError::NotFound(_) => {
                ApiError::not_found("project_not_found", format!("project {project} not found"))
            }
            other => other.into(),
        })
}

/// The records of `ids` in `project_id`, in order; 400 `attachment_not_found` for an id the
/// project does not hold.
pub async fn resolve(
    app: &App,
    project_id: &str,
    ids: Vec<String>,
) -> Result<Vec<AttachmentRecord>, ApiError> {
    let project = project_id.to_string();
    let found = app
        .base
        .read(move |rtx| {
            ids.into_iter()
                .map(|id| Ok((atts::get(rtx, &project, &id)?, id)))
                .collect::<Result<Vec<_>, weldr_storage::StorageError>>()
        })
        .await?;
    found
        .into_iter()
        .map(|(record, id)| {
            record.ok_or_else(|| {
                ApiError::bad_request(
                    "attachment_not_found",
                    format!(
                        "attachment {id} is not in project {project_id}; upload it first \
                         (POST /projects/{project_id}/attachments)"
                    ),
                )
            })
        })
        .collect()
}

pub fn to_ref(record: &AttachmentRecord) -> AttachmentRef {
    AttachmentRef {
        id: record.id.clone(),
        media_type: record.media_type.clone(),
        filename: record.filename.clone(),
        size: record.size,
    }
}

/// A well-formed attachment id: an `Id` that is also 64 lowercase hex digits.
pub fn check_attachment_id<'a>(what: &str, id: &'a str) -> Result<&'a str, ApiError> {
    check_id(what, id)?;
    if !atts::is_content_id(id) {
        return Err(ApiError::bad_request(
            "invalid_attachment_id",
            format!("{what} must be an attachment id: 64 lowercase hex digits (a sha-256)"),
        ));
    }
    Ok(id)
}

#[derive(Serialize, ToSchema)]
#[serde(rename_all = "camelCase")]
#[salvo(schema(name = Attachment))]
pub struct AttachmentView {
    /// The sha-256 of the bytes, lowercase hex: the id `/trigger`'s `attachmentIds` take.
    pub attachment_id: String,
    pub media_type: String,
    pub size: u64,
    pub filename: Option<String>,
}

impl From<AttachmentRecord> for AttachmentView {
    fn from(r: AttachmentRecord) -> Self {
        Self {
            attachment_id: r.id,
            media_type: r.media_type,
            size: r.size,
            filename: r.filename,
        }
    }
}

/// An upload's answer: 201 when the bytes are new, 200 when they were stored already.
pub struct Uploaded {
    view: AttachmentView,
    created: bool,
}

impl Scribe for Uploaded {
    fn render(self, res: &mut Response) {
        res.status_code(if self.created {
            StatusCode::CREATED
        } else {
            StatusCode::OK
        });
        res.render(Json(self.view));
    }
}

impl EndpointOutRegister for Uploaded {
    fn register(components: &mut Components, operation: &mut Operation) {
        let schema = AttachmentView::to_schema(components);
        for (status, text) in [
            ("201", "Stored"),
            ("200", "The same bytes were stored before: their record"),
        ] {
            operation.responses.insert(
                status,
                oapi::Response::new(text).add_content("application/json", schema.clone()),
            );
        }
    }
}

/// Documents the upload's request body (the endpoint macro documents one content type; this
/// body has several). Reads nothing: the handler reads the body after checking access.
pub struct UploadBody;

impl<'ex> salvo::extract::Extractible<'ex> for UploadBody {
    fn metadata() -> &'static salvo::extract::Metadata {
        static METADATA: salvo::extract::Metadata = salvo::extract::Metadata::new("");
        &METADATA
    }
    #[allow(refining_impl_trait)]
    async fn extract(_req: &'ex mut Request, _depot: &'ex mut Depot) -> Result<Self, ParseError> {
        Ok(Self)
    }
}

impl EndpointArgRegister for UploadBody {
    fn register(_components: &mut Components, operation: &mut Operation, _arg: &str) {
        let binary = || {
            Object::with_type(BasicType::String)
                .format(SchemaFormat::KnownFormat(KnownFormat::Binary))
        };
        let form = Object::new()
            .property("file", binary())
            .required("file")
            .description("One file part; its filename and Content-Type are kept.");
        let mut body = RequestBody::new()
            .description(
                "The file: a multipart/form-data body with one file part, or the raw bytes \
                 with their Content-Type (and `?filename=`). Images must be what their type \
                 says (magic number); text must be UTF-8. At most ATTACHMENT_MAX_BYTES.",
            )
            .required(Required::True)
            .add_content("multipart/form-data", Content::new(form));
        for media in IMAGE_TYPES
            .iter()
            .chain(["text/*"].iter())
            .chain(TEXT_TYPES.iter())
        {
            body = body.add_content(*media, Content::new(binary()));
        }
        operation.request_body = Some(body);
    }
}

/// Upload an attachment to a project: multipart/form-data (one file part) or the raw bytes
/// with their Content-Type. Content-addressed: the same bytes again answer 200 with the
/// record stored before.
#[endpoint(
    tags("attachments"),
    parameters(
        ("projectId" = crate::api::schema::Id, Path, description = "Project id"),
        ("filename" = Option<String>, Query, max_length = 255, description = "The file's name, for a raw body"),
    ),
    security(("bearer" = []), ("sessionCookie" = [])),
    status_codes(200, 201, 400, 401, 404, 413, 415, 431, 500, 503)
)]
pub async fn upload(
    req: &mut Request,
    depot: &mut Depot,
    _body: UploadBody,
) -> Result<Uploaded, ApiError> {
    let app = super::app(depot)?;
    let principal = principal(depot)?;
    let project_id = check_id(
        "projectId",
        req.param::<&str>("projectId").unwrap_or_default(),
    )?
    .to_string();
    require_project(&app, &principal, &project_id).await?;
    let max = app.config.attachment_max_bytes;
    let content_type = req
        .headers()
        .get("content-type")
        .and_then(|v| v.to_str().ok())
        .and_then(essence)
        .ok_or_else(|| untyped("the request"))?;
    let multipart = content_type == "multipart/form-data";
    let cap = if multipart {
        max + MULTIPART_OVERHEAD
    } else {
        max
    };
    match req.payload_with_max_size(cap).await {
        Ok(_) => {}
        Err(ParseError::PayloadTooLarge) => return Err(too_large(max)),
        Err(e) => {
            return Err(ApiError::bad_request(
                "invalid_body",
                format!("cannot read the request body: {e}"),
            ));
        }
    }
    let query_name = req.query::<String>("filename");
    let new = if multipart {
        from_form(req, &project_id, max).await?
    } else {
        let bytes = req
            .payload_with_max_size(cap)
            .await
            .map_err(|e| ApiError::internal(format!("the body read before is gone: {e}")))?
            .to_vec();
        NewAttachment {
            project_id: project_id.clone(),
            media_type: content_type,
            filename: None,
            bytes,
        }
    };
    let filename = match query_name.or(new.filename.clone()) {
        Some(name) => Some(check_filename(&name)?),
        None => None,
    };
    let (record, created) = store(&app, NewAttachment { filename, ..new }).await?;
    Ok(Uploaded {
        view: record.into(),
        created,
    })
}

/// The one file part of a multipart body (already read, within its limit).
async fn from_form(
    req: &mut Request,
    project_id: &str,
    max: usize,
) -> Result<NewAttachment, ApiError> {
    let form = req
        .form_data_max_size(max + MULTIPART_OVERHEAD)
        .await
        .map_err(|e| match e {
            ParseError::PayloadTooLarge => ApiError::bad_request(
                "invalid_multipart",
                "too many parts in the multipart body; send one file part",
            ),
            e => ApiError::bad_request("invalid_multipart", format!("multipart body: {e}")),
        })?;
    let files: Vec<_> = form.files.iter_all().flat_map(|(_, parts)| parts).collect();
    let part = match files.as_slice() {
        [one] => *one,
        [] => {
            return Err(ApiError::bad_request(
                "invalid_multipart",
                "the multipart body has no file part (a part with a filename)",
            ));
        }
        _ => {
            return Err(ApiError::bad_request(
                "invalid_multipart",
                "send one file part per upload",
            ));
        }
    };
    let media_type = part
        .content_type()
        .and_then(|m| essence(m.as_ref()))
        .ok_or_else(|| untyped("the file part"))?;
    if part.size() > max as u64 {
        return Err(too_large(max));
    }
    let bytes = tokio::fs::read(part.path())
        .await
        .map_err(|e| ApiError::internal(format!("reading the uploaded part: {e}")))?;
    Ok(NewAttachment {
        project_id: project_id.to_string(),
        media_type,
        filename: part.name().filter(|n| !n.is_empty()).map(str::to_string),
        bytes,
    })
}

/// An attachment's bytes as they were uploaded.
pub struct AttachmentBytes {
    record: AttachmentRecord,
    bytes: Vec<u8>,
}

impl Scribe for AttachmentBytes {
    fn render(self, res: &mut Response) {
        let media = &self.record.media_type;
        let content_type = if media.starts_with("text/") {
            format!("{media}; charset=utf-8")
        } else {
            media.clone()
        };
        let headers = res.headers_mut();
        if let Ok(v) = HeaderValue::from_str(&content_type) {
            headers.insert(salvo::http::header::CONTENT_TYPE, v);
        }
        headers.insert(
            salvo::http::header::X_CONTENT_TYPE_OPTIONS,
            HeaderValue::from_static("nosniff"),
        );
        // Content-addressed: these bytes never change under this URL.
        headers.insert(
            salvo::http::header::CACHE_CONTROL,
            HeaderValue::from_static("private, max-age=31536000, immutable"),
        );
        let disposition = content_disposition(is_image(media), self.record.filename.as_deref());
        if let Ok(v) = HeaderValue::from_str(&disposition) {
            headers.insert(salvo::http::header::CONTENT_DISPOSITION, v);
        }
        res.status_code(StatusCode::OK);
        res.body(bytes::Bytes::from(self.bytes));
    }
}

/// `inline` for images (a browser shows them), `attachment` for everything else (a browser
/// saves it instead of rendering a text/html upload as a page of this origin).
fn content_disposition(image: bool, filename: Option<&str>) -> String {
    let kind = if image { "inline" } else { "attachment" };
    let Some(name) = filename else {
        return kind.to_string();
    };
    let ascii: String = name
        .chars()
        .map(|c| {
            if c.is_ascii_graphic() && c != '"' && c != '\\' || c == ' ' {
                c
            } else {
                '_'
            }
        })
        .collect();
    let encoded =
        percent_encoding::utf8_percent_encode(name, percent_encoding::NON_ALPHANUMERIC).to_string();
    format!("{kind}; filename=\"{ascii}\"; filename*=UTF-8''{encoded}")
}

impl EndpointOutRegister for AttachmentBytes {
    fn register(_components: &mut Components, operation: &mut Operation) {
        let binary = Object::with_type(BasicType::String)
            .format(SchemaFormat::KnownFormat(KnownFormat::Binary));
        let mut response = oapi::Response::new(
            "The bytes, with their media type, `X-Content-Type-Options: nosniff`, and \
             `Content-Disposition: attachment` unless an image",
        );
        for media in IMAGE_TYPES
            .iter()
            .chain(["text/*"].iter())
            .chain(TEXT_TYPES.iter())
        {
            response = response.add_content(*media, Content::new(binary.clone()));
        }
        operation.responses.insert("200", response);
    }
}

/// An attachment's bytes.
#[endpoint(
    tags("attachments"),
    parameters(
        ("projectId" = crate::api::schema::Id, Path, description = "Project id"),
        ("attachmentId" = crate::api::schema::Id, Path, description = "Attachment id: the sha-256 of its bytes, 64 lowercase hex digits"),
    ),
    security(("bearer" = []), ("sessionCookie" = [])),
    status_codes(200, 400, 401, 404, 431, 500, 503)
)]
pub async fn get_attachment(
    req: &mut Request,
    depot: &mut Depot,
) -> Result<AttachmentBytes, ApiError> {
    let app = super::app(depot)?;
    let principal = principal(depot)?;
    let project_id = check_id(
        "projectId",
        req.param::<&str>("projectId").unwrap_or_default(),
    )?
    .to_string();
    let id = check_attachment_id(
        "attachmentId",
        req.param::<&str>("attachmentId").unwrap_or_default(),
    )?
    .to_string();
    require_project(&app, &principal, &project_id).await?;
    let (p, i) = (project_id.clone(), id.clone());
    let found = app
        .base
        .read(move |rtx| {
            let record = atts::get(rtx, &p, &i)?;
            let bytes = atts::get_bytes(rtx, &p, &i)?;
            Ok(record.zip(bytes))
        })
        .await?;
    let (record, bytes) = found.ok_or_else(|| {
        ApiError::not_found(
            "attachment_not_found",
            format!("attachment {id} not found in project {project_id}"),
        )
    })?;
    Ok(AttachmentBytes { record, bytes })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn media_types_are_checked_against_the_bytes() {
        let png = b"\x89PNG\r\n\x1a\n rest";
        assert!(check_content("image/png", png, 100).is_ok());
        let e = check_content("image/jpeg", png, 100).unwrap_err();
        assert_eq!(
            (e.status.as_u16(), e.code),
            (400, "attachment_type_mismatch")
        );
        assert!(check_content("image/webp", b"RIFF\0\0\0\0WEBPVP8 ", 100).is_ok());
        assert!(check_content("image/gif", b"GIF89a...", 100).is_ok());
        assert!(check_content("text/markdown", "# hé".as_bytes(), 100).is_ok());
        assert_eq!(
            check_content("application/json", b"\xff\xfe", 100)
                .unwrap_err()
                .code,
            "attachment_not_utf8"
        );
        let e = check_content("application/pdf", b"%PDF", 100).unwrap_err();
        assert_eq!(e.status.as_u16(), 415);
        assert_eq!(
            check_content("text/plain", b"", 100).unwrap_err().code,
            "empty_attachment"
        );
        let e = check_content("text/plain", b"12345", 4).unwrap_err();
        assert_eq!((e.status.as_u16(), e.code), (413, "attachment_too_large"));
    }

    #[test]
    fn essences_are_lowercase_without_parameters() {
        assert_eq!(
            essence("Text/Plain; charset=utf-8").as_deref(),
            Some("text/plain")
        );
        assert_eq!(essence("image/png").as_deref(), Some("image/png"));
        for bad in ["", "text", "/x", "text/", "a b/c", "text/plain\r\nx: y"] {
            assert_eq!(essence(bad), None, "{bad:?}");
        }
    }

    #[test]
    fn inline_data_is_a_data_url_or_base64_with_a_type() {
        let (m, b) = decode_inline("p", "data:image/png;base64,aGk=", None, 100).unwrap();
        assert_eq!((m.as_str(), b.as_slice()), ("image/png", &b"hi"[..]));
        let (m, b) = decode_inline("p", "aGk", Some("text/plain"), 100).unwrap();
        assert_eq!((m.as_str(), b.as_slice()), ("text/plain", &b"hi"[..]));
        for (value, declared) in [
            ("aGk=", None),
            ("data:image/png;base64,aGk=", Some("image/gif")),
            ("data:text/plain,hi", None),
            ("data:;base64,aGk=", None),
            ("not base64!", Some("text/plain")),
        ] {
            let e = decode_inline("p", value, declared, 100).unwrap_err();
            assert_eq!(e.code, "invalid_message", "{value}");
        }
        let big = "A".repeat(400);
        assert_eq!(
            decode_inline("p", &big, Some("text/plain"), 100)
                .unwrap_err()
                .code,
            "attachment_too_large"
        );
    }

    #[test]
    fn dispositions_quote_safely() {
        assert_eq!(content_disposition(true, None), "inline");
        assert_eq!(
            content_disposition(false, Some("a \"b\".txt")),
            "attachment; filename=\"a _b_.txt\"; filename*=UTF-8''a%20%22b%22%2Etxt"
        );
    }
}
