//! Chat prompts through the checkpoint's own chat template: `tokenizer_config.json`'s
//! `chat_template` (Jinja), rendered with minijinja the way transformers' `apply_chat_template`
//! does (`trim_blocks`, `lstrip_blocks`, `messages`, `add_generation_prompt`, `bos_token`,
//! `eos_token`, `raise_exception`).
use std::path::Path;

use minijinja::Value;

#[derive(Debug, thiserror::Error)]
pub enum TemplateError {
    #[error("the model has no chat template (no chat_template in {0}/tokenizer_config.json, no chat_template.jinja); use /v1/completions with a prompt")]
    Missing(String),
    #[error("{path}: {message}")]
    Config { path: String, message: String },
    #[error("the chat template failed: {0}")]
    Render(#[from] minijinja::Error),
}

/// One chat message as the template sees it.
#[derive(Debug, Clone)]
pub struct TemplateMessage {
    pub role: String,
    pub content: String,
}

impl TemplateMessage {
    /// As templates index it: `message['role']`, `message.content`.
    fn value(&self) -> Value {
        Value::from_pairs([("role", Value::from(self.role.as_str())), ("content", Value::from(self.content.as_str()))])
    }
}

#[derive(Debug, Clone)]
pub struct ChatTemplate {
    source: String,
    bos: String,
    eos: String,
}

/// `bos_token` / `eos_token` are a string or an `AddedToken` object with `content`.
fn token_text(v: Option<&serde_json::Value>) -> String {
    match v {
        Some(serde_json::Value::String(s)) => s.clone(),
        Some(serde_json::Value::Object(o)) => o.get("content").and_then(|c| c.as_str()).unwrap_or_default().to_string(),
        _ => String::new(),
    }
}

impl ChatTemplate {
    /// The template of the checkpoint in `dir`.
    pub fn load(dir: &Path) -> Result<ChatTemplate, TemplateError> {
        let path = dir.join("tokenizer_config.json");
        let missing = || TemplateError::Missing(dir.display().to_string());
        let text = match std::fs::read_to_string(&path) {
            Ok(t) => t,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Err(missing()),
            Err(e) => return Err(TemplateError::Config { path: path.display().to_string(), message: e.to_string() }),
        };
        let cfg: serde_json::Value =
            serde_json::from_str(&text).map_err(|e| TemplateError::Config { path: path.display().to_string(), message: e.to_string() })?;
        // A string, or (older checkpoints) a list of named templates of which "default" is used;
        // newer transformers save it beside the config as chat_template.jinja instead.
        let beside = std::fs::read_to_string(dir.join("chat_template.jinja")).ok();
        let source = match cfg.get("chat_template") {
            Some(serde_json::Value::String(s)) => s.clone(),
            Some(serde_json::Value::Array(list)) => list
                .iter()
                .find(|t| t.get("name").and_then(|n| n.as_str()) == Some("default"))
                .and_then(|t| t.get("template")?.as_str())
                .ok_or_else(missing)?
                .to_string(),
            _ => beside.ok_or_else(missing)?,
        };
        let t = ChatTemplate { source, bos: token_text(cfg.get("bos_token")), eos: token_text(cfg.get("eos_token")) };
        // Parse once now, so that a broken template is reported at start, not per request.
        t.env().template_from_str(&t.source)?;
        Ok(t)
    }

    fn env(&self) -> minijinja::Environment<'_> {
        let mut env = minijinja::Environment::new();
        // transformers compiles chat templates with trim_blocks and lstrip_blocks.
        if let Ok(syntax) = minijinja::syntax::SyntaxConfig::builder().trim_blocks(true).lstrip_blocks(true).build() {
            env.set_syntax(syntax);
        }
        env.set_unknown_method_callback(minijinja_contrib::pycompat::unknown_method_callback);
        env.add_function("raise_exception", |msg: String| -> Result<String, minijinja::Error> {
            Err(minijinja::Error::new(minijinja::ErrorKind::InvalidOperation, msg))
        });
        env
    }

    /// The prompt text for `messages`, ending where the assistant's reply begins.
    pub fn render(&self, messages: &[TemplateMessage]) -> Result<String, TemplateError> {
        let env = self.env();
        let t = env.template_from_str(&self.source)?;
        Ok(t.render(minijinja::context! {
            messages => Value::from(messages.iter().map(TemplateMessage::value).collect::<Vec<_>>()),
            add_generation_prompt => true,
            bos_token => &self.bos,
            eos_token => &self.eos,
        })?)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renders_chatml_and_reports_a_missing_template() {
        let dir = tempfile::tempdir().unwrap();
        assert!(matches!(ChatTemplate::load(dir.path()), Err(TemplateError::Missing(_))));
        let chatml = "{% for m in messages %}<|im_start|>{{ m.role }}\n{{ m.content.strip() }}<|im_end|>\n{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}";
        std::fs::write(dir.path().join("tokenizer_config.json"), serde_json::json!({"chat_template": chatml, "eos_token": {"content": "<|im_end|>"}}).to_string()).unwrap();
        let t = ChatTemplate::load(dir.path()).unwrap();
        assert_eq!(t.eos, "<|im_end|>");
        let out = t.render(&[TemplateMessage { role: "user".into(), content: " hi ".into() }]).unwrap();
        assert_eq!(out, "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n");
    }

    #[test]
    fn a_template_beside_the_config_and_the_default_models_own() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("tokenizer_config.json"), "{}").unwrap();
        std::fs::write(dir.path().join("chat_template.jinja"), "{% for m in messages %}[{{ m.role }}] {{ m.content }}\n{% endfor %}").unwrap();
        let out = ChatTemplate::load(dir.path()).unwrap().render(&[TemplateMessage { role: "user".into(), content: "x".into() }]).unwrap();
        assert_eq!(out, "[user] x\n");
        let tiny = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../models/tiny-moe");
        if tiny.join("tokenizer_config.json").exists() {
            let out = ChatTemplate::load(&tiny).unwrap().render(&[TemplateMessage { role: "user".into(), content: "hello".into() }]).unwrap();
            assert_eq!(out, "<|im_start|>user\nhello<|im_end|>\n<|im_start|>assistant\n");
        }
    }
}
