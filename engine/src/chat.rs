//! Chat prompts: render a model's Jinja chat template (from `tokenizer_config.json` or
//! `chat_template.jinja`) over a list of messages with `add_generation_prompt`, the way
//! transformers' `apply_chat_template` does: `trim_blocks` and `lstrip_blocks` on, the
//! special tokens as `bos_token` / `eos_token`, a `raise_exception` function, and Python
//! string methods (`.strip()`, `.startswith()`...) through minijinja's pycompat layer.

use std::collections::BTreeMap;

use minijinja::machinery::Instructions;
use minijinja::{context, Environment};
use serde::Serialize;

use crate::error::{Error, Result};
use crate::template_budget;

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
    template_budget::check_folded_repeats(template, syntax.clone()).map_err(|at| {
        Error::ChatTemplate(format!(
            "cannot parse: `*` next to a bracket or parenthesis ({at}): a repeated list \
             is built while the template compiles, outside any work budget, so llmem \
             refuses it"
        ))
    })?;
    env.set_syntax(syntax);
    env.set_fuel(Some(fuel_for(messages)));
    env.set_formatter(template_budget::capped_formatter);
    template_budget::register(&mut env);
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
    // The compiled template with `+`, `*` and `~` budgeted (see `template_budget`), run
    // as `Template::render` runs it.
    let compiled = minijinja::machinery::get_compiled_template(&tmpl);
    let instructions = template_budget::budgeted(&compiled.instructions);
    let blocks: BTreeMap<&str, Instructions> = compiled
        .blocks
        .iter()
        .map(|(name, block)| (*name, template_budget::budgeted(block)))
        .collect();
    let ctx = context! {
        messages => minijinja::Value::from(minijinja::value::Serde(messages)),
        add_generation_prompt => add_generation_prompt,
        bos_token => bos_token.unwrap_or(""),
        eos_token => eos_token.unwrap_or(""),
    };
    let mut text = String::new();
    let mut out = minijinja::machinery::make_string_output(&mut text);
    let auto_escape = compiled.initial_auto_escape.clone();
    let rendered =
        minijinja::machinery::eval(&env, &instructions, ctx, &blocks, &mut out, auto_escape)
            .map(|_| ());
    drop(out);
    rendered.map(|()| text).map_err(|e| match e.kind() {
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

    /// The error `t` renders to over one user message (it must fail).
    fn refusal(t: &str) -> String {
        render_chat(t, &[ChatMessage::user("hi")], None, None, false)
            .unwrap_err()
            .to_string()
    }

    #[test]
    fn a_runaway_template_stops_at_its_budget_and_long_chats_fit_in_it() {
        // Three nested loops of 1000 steps each: a billion steps without a budget.
        let t = "{% for a in range(1000) %}{% for b in range(1000) %}{% for c in range(1000) %}x{% endfor %}{% endfor %}{% endfor %}";
        let err = refusal(t);
        assert!(err.contains("work budget"), "{err}");
        // A lazy list of ten million numbers costs nothing to make; printing it would
        // write 180 MB before minijinja charged for the output. Alone and nested.
        for t in [
            "{% set l = [99999999999999999] %}{{ l * 9999990 }}",
            "{% set l = [99999999999999999998] %}{{ [l * 9999990] }}",
        ] {
            let err = refusal(t);
            assert!(err.contains("ran past its work budget"), "{t}: {err}");
        }
        // Lists and maps of ordinary size print as minijinja prints them.
        let t = "{{ [1, 'a', [2, 3]] }} {{ {'k': [4]} }}";
        let out = render_chat(t, &[ChatMessage::user("hi")], None, None, false).unwrap();
        assert_eq!(out, "[1, 'a', [2, 3]] {'k': [4]}");
        // A constant repeated list is refused before minijinja folds it while compiling.
        for t in [
            "{{ [9999] * 99909999 ~ 9 }}",
            "{{ 1000 * ([1]) }}",
            "{{ (1,) * 5 }}",
        ] {
            let err = refusal(t);
            assert!(err.contains("next to a bracket"), "{t}: {err}");
        }
        // `~` turns a lazily repeated list into a string: 100 million items.
        for t in [
            "{% set l = [9999] %}{{ l * 99909999 ~ 9 }}",
            "{% set l = [1] %}{{ 'x' ~ (l * 99999999) }}",
            "{% set ns = namespace(l=[1]) %}{% for i in range(60) %}{% set ns.l = ns.l + ns.l %}{% endfor %}{{ ns.l | length }}",
            "{{ 'xxxxxxxxxxxxxxxx' * 99999999 }}",
            "{% set l = ['x' * 1000] %}{{ (l * 100000) ~ '' }}",
        ] {
            let err = refusal(t);
            assert!(err.contains("work budget"), "{t}: {err}");
        }
        // Ordinary arithmetic, repeats and joins render as minijinja renders them.
        let t = "{{ 1 + 2 }} {{ 2 * 3.5 }} {{ 'ab' * 3 }} {% set l = [1, 2] %}{{ l * 2 }} {{ [1] + [2] }} \
                 {{ 'a' ~ 1 ~ none ~ [3] ~ {'k': 2} }} {{ 'a' + 'b' }} {{ -2 * 2 }} \
                 {% for x in [1, 2, 3] if x > 1 %}{{ loop.index }}{% endfor %}\
                 {{ messages[0].content ~ '!' }} {{ 2 ** 10 }} {{ 7 // 2 }} {{ 'x' in 'xyz' }}";
        let msgs = [ChatMessage::user("hi")];
        let out = render_chat(t, &msgs, None, None, false).unwrap();
        let mut stock = Environment::new();
        stock.set_unknown_method_callback(minijinja_contrib::pycompat::unknown_method_callback);
        let want = stock
            .render_str(
                t,
                context! { messages => minijinja::Value::from(minijinja::value::Serde(&msgs)) },
            )
            .unwrap();
        assert_eq!(out, want);
        // A string doubled 40 times would be a terabyte.
        let t = "{% set ns = namespace(s='xxxxxxxx') %}{% for i in range(40) %}{% set ns.s = ns.s + ns.s %}{% endfor %}{{ ns.s }}";
        let err = refusal(t);
        assert!(err.contains("work budget"), "{err}");
        // A real template over a long conversation of long messages stays inside it.
        let long: Vec<ChatMessage> = (0..4000)
            .map(|i| ChatMessage::user("word ".repeat(400 + i % 7)))
            .collect();
        let out = render_chat(SMOLLM, &long, None, None, true).unwrap();
        assert!(out.len() > 4000 * 2000, "{}", out.len());
    }
}
