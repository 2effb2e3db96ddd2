//! `GET /reference`: a self-contained API reference page (works offline, in desktop mode too).

use salvo::prelude::*;

const PAGE: &str = include_str!("../../web/reference.html");

#[handler]
pub async fn reference(res: &mut Response) {
    res.render(Text::Html(PAGE));
}
