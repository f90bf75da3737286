//! Chat prompts: render a model's Jinja chat template (from `tokenizer_config.json` or
//! `chat_template.jinja`) over a list of messages with `add_generation_prompt`, the way
//! transformers' `apply_chat_template` does: `trim_blocks` and `lstrip_blocks` on, the
//! special tokens as `bos_token` / `eos_token`, a `raise_exception` function, and Python
//! string methods (`.strip()`, `.startswith()`...) through minijinja's pycompat layer.

use minijinja::{context, Environment};
use serde::Serialize;

use crate::error::{Error, Result};

/// One chat message.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct ChatMessage {
    /// "system", "user" or "assistant".
    pub role: String,
    pub content: String,
}

impl ChatMessage {
    pub fn user(content: impl Into<String>) -> Self {
        ChatMessage {
            role: "user".into(),
            content: content.into(),
        }
    }
}

/// The work one render may do, in minijinja fuel (about one unit per instruction run
/// and per 64 bytes created): 100,000 units, plus 2,000 per message and one per 4 bytes
/// of content. Real templates use a few dozen units per message; a template from an
/// untrusted file that loops over loops, sorts or multiplies strings stops with a clear
/// error instead of running for seconds or filling memory (the fuzz target holds every
/// render to well under its 1 s limit).
fn fuel_for(messages: &[ChatMessage]) -> u64 {
    let content: usize = messages
        .iter()
        .map(|m| m.content.len() + m.role.len())
        .sum();
    100_000 + 2_000 * messages.len() as u64 + content as u64 / 4
}

/// Bytes of output one unit of fuel pays for (minijinja's rate).
const BYTES_PER_FUEL: u64 = 64;

/// A writer that forwards to `out` until `left` bytes are spent, then fails.
struct Capped<'a, W: std::fmt::Write> {
    out: &'a mut W,
    left: u64,
    over: bool,
}

impl<W: std::fmt::Write> std::fmt::Write for Capped<'_, W> {
    fn write_str(&mut self, s: &str) -> std::fmt::Result {
        match self.left.checked_sub(s.len() as u64) {
            Some(left) => {
                self.left = left;
                self.out.write_str(s)
            }
            None => {
                self.over = true;
                Err(std::fmt::Error)
            }
        }
    }
}

/// Items one printed value may hold, nested ones included: a prompt never prints a list
/// this long.
const MAX_PRINTED_ITEMS: u64 = 100_000;

/// Whether `value` holds more than `budget` items, counting nested sequences and maps;
/// visits at most `budget` items (a lazy sequence knows its length without them).
fn too_many_items(value: &minijinja::Value, budget: &mut u64) -> bool {
    use minijinja::value::ValueKind;
    let kind = value.kind();
    if !matches!(kind, ValueKind::Seq | ValueKind::Map | ValueKind::Iterable) {
        return false;
    }
    if value.len().is_some_and(|n| n as u64 > *budget) {
        return true;
    }
    let Ok(iter) = value.try_iter() else {
        return false;
    };
    for item in iter {
        if *budget == 0 {
            return true;
        }
        *budget -= 1;
        let inner = if kind == ValueKind::Map {
            value.get_item(&item).unwrap_or_default()
        } else {
            item
        };
        if too_many_items(&inner, budget) {
            return true;
        }
    }
    false
}

/// minijinja's formatter, stopped at the fuel left: minijinja charges a value's output
/// after writing it, so `{{ [1] * 9999999 }}` (a lazy list, cheap to make) would write
/// megabytes before the budget saw them. Values print as they would without it.
fn capped_formatter(
    out: &mut minijinja::Output,
    state: &mut minijinja::State,
    value: &minijinja::Value,
) -> std::result::Result<(), minijinja::Error> {
    use std::fmt::Write;
    if *state.auto_escape() != minijinja::AutoEscape::None {
        return minijinja::escape_formatter(out, state, value);
    }
    let left = state
        .fuel_levels()
        .map_or(u64::MAX, |(_, left)| left.saturating_mul(BYTES_PER_FUEL));
    // Each item prints at least two bytes (its text and a separator): a container with
    // more items than the bytes left could pay for is refused before any is printed
    // (printing a lazy `[x] * 9999990` visits every item even after the output fails).
    let mut items = (left / 2).min(MAX_PRINTED_ITEMS);
    if too_many_items(value, &mut items) {
        return Err(minijinja::Error::new(
            minijinja::ErrorKind::OutOfFuel,
            "a printed value holds more items than the budget left",
        ));
    }
    let mut w = Capped {
        out,
        left,
        over: false,
    };
    match write!(w, "{value}") {
        Ok(()) => Ok(()),
        Err(_) if w.over => Err(minijinja::Error::new(
            minijinja::ErrorKind::OutOfFuel,
            "a printed value is larger than the budget left",
        )),
        Err(e) => Err(minijinja::Error::from(e)),
    }
}

/// Render `template` over `messages`. The result is the prompt text, special tokens
/// included as text (the tokenizer maps them to their ids).
pub fn render_chat(
    template: &str,
    messages: &[ChatMessage],
    bos_token: Option<&str>,
    eos_token: Option<&str>,
    add_generation_prompt: bool,
) -> Result<String> {
    let mut env = Environment::new();
    let syntax = minijinja::syntax::SyntaxConfig::builder()
        .trim_blocks(true)
        .lstrip_blocks(true)
        .build()
        .map_err(|e| Error::ChatTemplate(format!("syntax: {e}")))?;
    env.set_syntax(syntax);
    env.set_fuel(Some(fuel_for(messages)));
    env.set_formatter(capped_formatter);
    env.set_unknown_method_callback(minijinja_contrib::pycompat::unknown_method_callback);
    env.add_function(
        "raise_exception",
        |msg: String| -> std::result::Result<String, minijinja::Error> {
            Err(minijinja::Error::new(
                minijinja::ErrorKind::InvalidOperation,
                msg,
            ))
        },
    );
    env.add_template("chat", template)
        .map_err(|e| Error::ChatTemplate(format!("cannot parse: {e}")))?;
    let tmpl = env
        .get_template("chat")
        .map_err(|e| Error::ChatTemplate(e.to_string()))?;
    tmpl.render(context! {
        messages => minijinja::Value::from(minijinja::value::Serde(messages)),
        add_generation_prompt => add_generation_prompt,
        bos_token => bos_token.unwrap_or(""),
        eos_token => eos_token.unwrap_or(""),
    })
    .map_err(|e| match e.kind() {
        minijinja::ErrorKind::OutOfFuel => Error::ChatTemplate(format!(
            "cannot render: the template ran past its work budget of {} steps for {} \
             messages (a loop that never ends or grows too fast)",
            fuel_for(messages),
            messages.len()
        )),
        _ => Error::ChatTemplate(format!("cannot render: {e}")),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    const SMOLLM: &str = "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}{{ '<|im_start|>system\\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\\n' }}{% endif %}{{'<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}";

    #[test]
    fn smollm_template_inserts_default_system_prompt() {
        let out = render_chat(SMOLLM, &[ChatMessage::user("Hi")], None, None, true).unwrap();
        assert_eq!(
            out,
            "<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n"
        );
    }

    #[test]
    fn python_methods_and_exceptions() {
        let t = "{% if messages[0].role != 'user' %}{{ raise_exception('bad role') }}{% endif %}{{ messages[0].content.strip() }}";
        assert_eq!(
            render_chat(t, &[ChatMessage::user("  x ")], None, None, false).unwrap(),
            "x"
        );
        let sys = ChatMessage {
            role: "system".into(),
            content: "s".into(),
        };
        let err = render_chat(t, &[sys], None, None, false)
            .unwrap_err()
            .to_string();
        assert!(err.contains("bad role"), "{err}");
    }

    #[test]
    fn a_runaway_template_stops_at_its_budget_and_long_chats_fit_in_it() {
        // Three nested loops of 1000 steps each: a billion steps without a budget.
        let t = "{% for a in range(1000) %}{% for b in range(1000) %}{% for c in range(1000) %}x{% endfor %}{% endfor %}{% endfor %}";
        let err = render_chat(t, &[ChatMessage::user("hi")], None, None, false)
            .unwrap_err()
            .to_string();
        assert!(err.contains("work budget"), "{err}");
        // A lazy list of ten million numbers costs nothing to make; printing it would
        // write 180 MB before minijinja charged for the output.
        let t = "{{ [99999999999999999] * 9999990 }}";
        let err = render_chat(t, &[ChatMessage::user("hi")], None, None, false)
            .unwrap_err()
            .to_string();
        assert!(err.contains("work budget"), "{err}");
        // The same list nested in another.
        let t = "{{ [[99999999999999999998] * 9999990] }}";
        let err = render_chat(t, &[ChatMessage::user("hi")], None, None, false)
            .unwrap_err()
            .to_string();
        assert!(err.contains("work budget"), "{err}");
        // Lists and maps of ordinary size print as minijinja prints them.
        let t = "{{ [1, 'a', [2, 3]] }} {{ {'k': [4]} }}";
        let out = render_chat(t, &[ChatMessage::user("hi")], None, None, false).unwrap();
        assert_eq!(out, "[1, 'a', [2, 3]] {'k': [4]}");
        // A string doubled 40 times would be a terabyte.
        let t = "{% set ns = namespace(s='xxxxxxxx') %}{% for i in range(40) %}{% set ns.s = ns.s + ns.s %}{% endfor %}{{ ns.s }}";
        let err = render_chat(t, &[ChatMessage::user("hi")], None, None, false)
            .unwrap_err()
            .to_string();
        assert!(err.contains("work budget"), "{err}");
        // A real template over a long conversation of long messages stays inside it.
        let long: Vec<ChatMessage> = (0..4000)
            .map(|i| ChatMessage::user("word ".repeat(400 + i % 7)))
            .collect();
        let out = render_chat(SMOLLM, &long, None, None, true).unwrap();
        assert!(out.len() > 4000 * 2000, "{}", out.len());
    }
}
