//! How many tokens a model may write in one turn.
//!
//! A turn starts with a moderate limit ([`START_OUTPUT_TOKENS`], or the model's maximum when
//! that is lower). When the output hits it (`max_tokens`, `length`, `MAX_TOKENS`,
//! `max_output_tokens`), typically in the middle of a large `write_file`, the engine drops the
//! cut-off turn and asks again with twice the limit, up to the model's maximum from the table
//! below (from each provider's model documentation) or `WELDR_MAX_OUTPUT_TOKENS`.

/// The first limit of a turn.
pub const START_OUTPUT_TOKENS: u32 = 16_384;

/// The most output tokens `model` of `provider` allows in one turn; `fallback` for models the
/// table does not know.
pub fn model_max_output_tokens(provider: &str, model: &str) -> u32 {
    /// (provider, model name prefixes, most output tokens), first match wins.
    const TABLE: &[(&str, &[&str], u32)] = &[
        (
            "anthropic",
            &[
                "claude-3-5",
                "claude-3-haiku",
                "claude-3-opus",
                "claude-3-sonnet",
            ],
            8_192,
        ),
        (
            "anthropic",
            &["claude-opus-4-0", "claude-opus-4-1", "claude-opus-4-2025"],
            32_000,
        ),
        ("anthropic", &["claude-"], 64_000),
        ("openai", &["gpt-5"], 128_000),
        ("openai", &["o1", "o3", "o4"], 100_000),
        ("openai", &["gpt-4.1"], 32_768),
        ("openai", &[""], 16_384),
        ("gemini", &["gemini-2.5", "gemini-3"], 65_536),
    ];
    let m = model.to_ascii_lowercase();
    let m = m.strip_prefix("models/").unwrap_or(&m);
    TABLE
        .iter()
        .find(|(p, prefixes, _)| *p == provider && prefixes.iter().any(|x| m.starts_with(x)))
        .map(|(_, _, max)| *max)
        // Unknown models, and compatible servers: what most local models are configured for.
        .unwrap_or(8_192)
}

/// The context window of `model` of `provider`, in tokens (from each provider's model
/// documentation); 32,768 for models the table does not know (local models are often
/// configured for less: set `WELDR_CONTEXT_TOKENS`).
pub fn model_context_tokens(provider: &str, model: &str) -> u32 {
    /// (provider, model name prefixes, context window), first match wins.
    const TABLE: &[(&str, &[&str], u32)] = &[
        ("anthropic", &["claude-"], 200_000),
        ("openai", &["gpt-5"], 400_000),
        ("openai", &["gpt-4.1"], 1_047_576),
        ("openai", &["o1", "o3", "o4"], 200_000),
        ("openai", &["gpt-4o", "chatgpt-4o"], 128_000),
        ("openai", &[""], 128_000),
        ("gemini", &["gemini-"], 1_048_576),
    ];
    let m = model.to_ascii_lowercase();
    let m = m.strip_prefix("models/").unwrap_or(&m);
    TABLE
        .iter()
        .find(|(p, prefixes, _)| *p == provider && prefixes.iter().any(|x| m.starts_with(x)))
        .map(|(_, _, n)| *n)
        .unwrap_or(32_768)
}

/// The context window a request must fit in: the model's, or the operator's override.
pub fn context_tokens(provider: &str, model: &str, configured: Option<u32>) -> u32 {
    configured
        .unwrap_or_else(|| model_context_tokens(provider, model))
        .max(2048)
}

/// Does `model` of `provider` take images? Every Claude, GPT-4o/4.1/5, o-series and Gemini
/// model does; of the local models only those known to (vision models): others get a clear
/// refusal instead of a silently dropped image.
pub fn accepts_images(provider: &str, model: &str) -> bool {
    let m = model.to_ascii_lowercase();
    match provider {
        "anthropic" | "gemini" | "replay" => true,
        "openai" => {
            !m.starts_with("gpt-3.5") && !m.starts_with("o1-mini") && !m.starts_with("o3-mini")
        }
        "ollama" => [
            "llava",
            "vision",
            "-vl",
            "minicpm-v",
            "moondream",
            "bakllava",
            "gemma3",
            "llama4",
            "mistral-small3",
        ]
        .iter()
        .any(|x| m.contains(x)),
        _ => false,
    }
}

/// Does `provider` take images of `media_type` (one of the four [`super::Part::Image`]
/// allows)? Gemini takes no GIF (it answers `Unsupported MIME type: image/gif`); the others
/// take all four.
pub fn accepts_image_type(provider: &str, media_type: &str) -> bool {
    match provider {
        "gemini" => ["image/png", "image/jpeg", "image/webp"].contains(&media_type),
        _ => ["image/png", "image/jpeg", "image/gif", "image/webp"].contains(&media_type),
    }
}

/// The output limit of a turn: the model's maximum, or the operator's override.
pub fn max_output_tokens(provider: &str, model: &str, configured: Option<u32>) -> u32 {
    configured
        .unwrap_or_else(|| model_max_output_tokens(provider, model))
        .max(256)
}

/// The limit for the next try after a turn was cut at `current`; None when it cannot grow.
pub fn raised(current: u32, max: u32) -> Option<u32> {
    (current < max).then(|| current.saturating_mul(2).min(max))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn limits() {
        assert_eq!(
            model_max_output_tokens("anthropic", "claude-sonnet-4-5"),
            64_000
        );
        assert_eq!(
            model_max_output_tokens("anthropic", "claude-opus-4-1"),
            32_000
        );
        assert_eq!(model_max_output_tokens("openai", "gpt-4.1-mini"), 32_768);
        assert_eq!(model_max_output_tokens("gemini", "gemini-2.5-pro"), 65_536);
        assert_eq!(max_output_tokens("ollama", "qwen", Some(4000)), 4000);
        assert_eq!(raised(16_384, 64_000), Some(32_768));
        assert_eq!(raised(32_768, 64_000), Some(64_000));
        assert_eq!(raised(64_000, 64_000), None);
        assert!(accepts_image_type("anthropic", "image/gif"));
        assert!(!accepts_image_type("gemini", "image/gif"));
        assert!(accepts_image_type("gemini", "image/webp"));
        assert!(!accepts_image_type("openai", "image/bmp"));
    }
}
