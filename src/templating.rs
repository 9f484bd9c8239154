//! Rendering of tenant templates with minijinja: strict (a missing variable is an error), HTML
//! escaped in the HTML body, and bounded (fuel) so a tenant's template cannot run forever.

use minijinja::{Environment, UndefinedBehavior, Value};

use crate::domain::FieldError;

/// Most instructions one render may run.
const FUEL: u64 = 200_000;

/// The three parts of an email to render.
#[derive(Debug, Clone, Default)]
pub struct Sources<'a> {
    /// Subject template.
    pub subject: &'a str,
    /// Plain-text body template.
    pub text: &'a str,
    /// HTML body template.
    pub html: &'a str,
}

/// The rendered parts (empty where the source was empty).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Rendered {
    /// Subject.
    pub subject: String,
    /// Plain-text body.
    pub text: String,
    /// HTML body.
    pub html: String,
}

fn environment() -> Environment<'static> {
    let mut env = Environment::new();
    env.set_undefined_behavior(UndefinedBehavior::Strict);
    env.set_fuel(Some(FUEL));
    env.set_recursion_limit(50);
    // Escape by name: the HTML body is compiled as "html_body.html".
    env.set_auto_escape_callback(|name| {
        if name.ends_with(".html") {
            minijinja::AutoEscape::Html
        } else {
            minijinja::AutoEscape::None
        }
    });
    env
}

fn part_names(prefix: &str) -> [(String, &'static str); 3] {
    [
        (format!("{prefix}subject"), "subject.txt"),
        (format!("{prefix}text_body"), "text_body.txt"),
        (format!("{prefix}html_body"), "html_body.html"),
    ]
}

/// Checks that the templates compile; `prefix` names the fields (e.g. `template.`).
pub fn check(sources: &Sources<'_>, prefix: &str) -> Result<(), Vec<FieldError>> {
    let env = environment();
    let mut errors = Vec::new();
    let texts = [sources.subject, sources.text, sources.html];
    for ((field, name), text) in part_names(prefix).into_iter().zip(texts) {
        if let Err(e) = env.template_from_named_str(name, text) {
            errors.push(FieldError::new(
                field,
                format!("template error: {}", describe(&e)),
            ));
        }
    }
    if errors.is_empty() {
        Ok(())
    } else {
        Err(errors)
    }
}

/// Renders with `variables` (a JSON object) plus `gateway_url`, always available.
#[tracing::instrument(target = "mailgate::trace", name = "render", skip_all)]
pub fn render(
    sources: &Sources<'_>,
    variables: &serde_json::Value,
    gateway_url: &str,
) -> Result<Rendered, Vec<FieldError>> {
    let env = environment();
    let mut context = match variables {
        serde_json::Value::Object(map) => map.clone(),
        _ => serde_json::Map::new(),
    };
    context
        .entry("gateway_url")
        .or_insert_with(|| serde_json::Value::String(gateway_url.to_owned()));
    let context = Value::from_serialize(&context);
    let mut out = [String::new(), String::new(), String::new()];
    let mut errors = Vec::new();
    let texts = [sources.subject, sources.text, sources.html];
    for (i, ((field, name), text)) in part_names("").into_iter().zip(texts).enumerate() {
        if text.is_empty() {
            continue;
        }
        let result = env
            .template_from_named_str(name, text)
            .and_then(|t| t.render(&context));
        match result {
            Ok(rendered) => out[i] = rendered,
            Err(e) => errors.push(FieldError::new(
                "variables",
                format!("rendering {field}: {}", describe(&e)),
            )),
        }
    }
    if !errors.is_empty() {
        return Err(errors);
    }
    let [subject, text, html] = out;
    if subject.contains(['\r', '\n']) {
        return Err(vec![FieldError::new(
            "variables",
            "the rendered subject contains a line break",
        )]);
    }
    Ok(Rendered {
        subject,
        text,
        html,
    })
}

fn describe(e: &minijinja::Error) -> String {
    match e.detail() {
        Some(detail) => format!("{} ({detail}, line {})", e.kind(), e.line().unwrap_or(0)),
        None => e.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn sources<'a>(subject: &'a str, text: &'a str, html: &'a str) -> Sources<'a> {
        Sources {
            subject,
            text,
            html,
        }
    }

    #[test]
    fn renders_strictly_and_escapes_html() {
        let s = sources(
            "Hi {{ name }}",
            "Open {{ gateway_url }}/auth?code={{ code }}",
            "<p>Hello {{ name }}</p>",
        );
        let out = render(&s, &json!({"name": "<Bob>", "code": 42}), "https://gw.test").unwrap();
        assert_eq!(out.subject, "Hi <Bob>");
        assert_eq!(out.text, "Open https://gw.test/auth?code=42");
        assert_eq!(out.html, "<p>Hello &lt;Bob&gt;</p>");
        let err = render(&s, &json!({"name": "x"}), "").unwrap_err();
        assert_eq!(err[0].field, "variables");
        assert!(
            err[0].description.contains("text_body"),
            "{}",
            err[0].description
        );
    }

    #[test]
    fn syntax_errors_name_the_field_and_loops_are_bounded() {
        let err = check(&sources("{{ oops", "", ""), "template.").unwrap_err();
        assert_eq!(err[0].field, "template.subject");
        let forever = sources(
            "x",
            "{% for i in range(100000) %}{% for j in range(100000) %}{% endfor %}{% endfor %}",
            "",
        );
        assert!(render(&forever, &json!({}), "").is_err());
    }
}
