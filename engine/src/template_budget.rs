//! Running an untrusted Jinja template (a model file's chat template) within a work
//! budget.
//!
//! minijinja's fuel charges each instruction and the bytes a template creates, but some
//! of its operations build or print large values before charging for them: `[x] * n`
//! and `list + list` make lazy sequences of up to 100 million items for almost nothing,
//! and printing one (`{{ }}`) or joining it into a string (`~`) visits every item. A
//! hostile template could spend seconds and gigabytes per render that way. So:
//!
//! - [`budgeted`] copies a compiled template with its `+`, `*` and `~` instructions
//!   replaced by calls to [`add`], [`mul`] and [`concat`] (same stack effect: two operands
//!   in, one value out, so every jump offset stays valid), which refuse a sequence of more
//!   items than the fuel left could print and charge strings before they are made, then
//!   leave the operation to minijinja;
//! - [`capped_formatter`] stops a printed value at the bytes the fuel left can pay for.
//!
//! Running out is minijinja's `OutOfFuel` error. The ops live in a second, plain
//! environment ([`OPS`]): the arithmetic on numbers, and the sequences and strings already
//! checked, are minijinja's own.

use std::fmt::Write;
use std::sync::LazyLock;

use minijinja::machinery::{Instruction, Instructions};
use minijinja::value::ValueKind;
use minijinja::{Environment, Error, ErrorKind, State, Value};

/// Bytes of output one unit of fuel pays for (minijinja's rate).
const BYTES_PER_FUEL: u64 = 64;

/// Items one value may hold, nested ones included: a prompt never needs a longer list.
const MAX_ITEMS: u64 = 100_000;

/// The names the replaced instructions call.
pub(crate) const ADD: &str = "__llmem_add";
pub(crate) const MUL: &str = "__llmem_mul";
pub(crate) const CONCAT: &str = "__llmem_concat";

/// Register [`add`], [`mul`] and [`concat`] under the names [`budgeted`] calls.
pub(crate) fn register(env: &mut Environment<'_>) {
    env.add_function(ADD, add);
    env.add_function(MUL, mul);
    env.add_function(CONCAT, concat);
}

/// `instructions` with `Add`, `Mul` and `StringConcat` replaced by calls to the budgeted
/// functions, one for one, spans and lines kept.
pub(crate) fn budgeted<'s>(instructions: &Instructions<'s>) -> Instructions<'s> {
    let mut out = Instructions::new(instructions.name(), instructions.source());
    let mut idx = 0u32;
    while let Some(instr) = instructions.get(idx) {
        let instr = match instr {
            Instruction::Add => Instruction::CallFunction(ADD, Some(2)),
            Instruction::Mul => Instruction::CallFunction(MUL, Some(2)),
            Instruction::StringConcat => Instruction::CallFunction(CONCAT, Some(2)),
            other => other.clone(),
        };
        match (instructions.get_span(idx), instructions.get_line(idx)) {
            (Some(span), _) => out.add_with_span(instr, span),
            (None, Some(line)) => out.add_with_line(instr, u16::try_from(line).unwrap_or(u16::MAX)),
            (None, None) => out.add(instr),
        };
        idx += 1;
    }
    out
}

/// Refuse `*` next to a bracket or parenthesis (`[x] * n`, `n * (..)`): minijinja folds
/// constant expressions while compiling, before any budget exists, and a folded
/// `[x] * 99999999 ~ ''` builds a 600 MB string in `Environment::add_template`. A
/// repeated list has no use in a chat prompt; numbers and strings multiply as usual, and
/// a product of variables runs through [`mul`]. Returns the offending line, if any.
pub(crate) fn check_folded_repeats(
    source: &str,
    syntax: minijinja::syntax::SyntaxConfig,
) -> Result<(), String> {
    use minijinja::machinery::{tokenize, Token};
    let mut prev: Option<Token> = None;
    let mut pending: Option<u16> = None;
    for item in tokenize(source, false, syntax) {
        // A template that does not lex is left to minijinja's own error.
        let Ok((token, span)) = item else {
            return Ok(());
        };
        let opens = matches!(token, Token::BracketOpen | Token::ParenOpen);
        if let Some(line) = pending.take() {
            if opens {
                return Err(format!("line {line}"));
            }
        }
        if matches!(token, Token::Mul) {
            let closes = matches!(prev, Some(Token::BracketClose | Token::ParenClose));
            if closes {
                return Err(format!("line {}", span.start_line));
            }
            pending = Some(span.start_line);
        }
        prev = Some(token);
    }
    Ok(())
}

fn out_of_fuel(what: impl Into<String>) -> Error {
    Error::new(ErrorKind::OutOfFuel, what.into())
}

/// Fuel left, in bytes it can pay for (unlimited without fuel).
fn bytes_left(state: &State) -> u64 {
    state
        .fuel_levels()
        .map_or(u64::MAX, |(_, left)| left.saturating_mul(BYTES_PER_FUEL))
}

/// Items a value made now may hold: each prints at least two bytes.
fn items_left(state: &State) -> u64 {
    (bytes_left(state) / 2).min(MAX_ITEMS)
}

/// Charge `bytes` before making a string of that size.
fn charge_bytes(state: &State, bytes: u64) -> Result<(), Error> {
    state.consume_fuel(bytes.div_ceil(BYTES_PER_FUEL))
}

fn is_sequence(v: &Value) -> bool {
    matches!(v.kind(), ValueKind::Seq | ValueKind::Iterable)
}

/// Whether `value` holds more than `budget` items, counting nested sequences and maps;
/// visits at most `budget` items (a lazy sequence knows its length without them).
pub(crate) fn too_many_items(value: &Value, budget: &mut u64) -> bool {
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

/// Items of a sequence, counted up to `cap` (`cap + 1` when it holds more).
fn items_upto(v: &Value, cap: u64) -> u64 {
    if let Some(n) = v.len() {
        return n as u64;
    }
    let mut budget = cap;
    if too_many_items(v, &mut budget) {
        cap + 1
    } else {
        cap - budget
    }
}

/// A writer that forwards to `out` until `left` bytes are spent, then fails.
struct Capped<'a, W: Write> {
    out: &'a mut W,
    left: u64,
    over: bool,
}

impl<W: Write> Write for Capped<'_, W> {
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

/// Write `value` as minijinja prints it into `out`, at most `left` bytes and, for a
/// container, at most as many items as those bytes could hold.
fn write_capped<W: Write>(out: &mut W, value: &Value, left: u64) -> Result<u64, Error> {
    let mut items = (left / 2).min(MAX_ITEMS);
    if too_many_items(value, &mut items) {
        return Err(out_of_fuel(
            "a value turned into text holds more items than the budget left",
        ));
    }
    let mut w = Capped {
        out,
        left,
        over: false,
    };
    match write!(w, "{value}") {
        Ok(()) => Ok(left - w.left),
        Err(_) if w.over => Err(out_of_fuel(
            "a value turned into text is larger than the budget left",
        )),
        Err(e) => Err(Error::from(e)),
    }
}

/// minijinja's formatter, stopped at the fuel left: minijinja charges a value's output
/// after writing it. Values print as they would without it.
pub(crate) fn capped_formatter(
    out: &mut minijinja::Output,
    state: &mut State,
    value: &Value,
) -> Result<(), Error> {
    if *state.auto_escape() != minijinja::AutoEscape::None {
        return minijinja::escape_formatter(out, state, value);
    }
    let left = bytes_left(state);
    write_capped(out, value, left).map(|_| ())
}

/// The plain environment that runs the operations once they are checked.
static OPS: LazyLock<Environment<'static>> = LazyLock::new(Environment::new);

type Op = LazyLock<Result<minijinja::Expression<'static, 'static>, Error>>;
static PLUS: Op = LazyLock::new(|| OPS.compile_expression("a + b"));
static TIMES: Op = LazyLock::new(|| OPS.compile_expression("a * b"));

/// minijinja's own `a <op> b`, compiled once.
fn minijinja_op(op: &Op, a: Value, b: Value) -> Result<Value, Error> {
    match &**op {
        Ok(expr) => expr.eval(minijinja::context! { a => a, b => b }),
        Err(e) => Err(Error::new(e.kind(), e.to_string())),
    }
}

/// `a` and `b` joined, a safe string only when both are (as minijinja joins them).
fn joined(text: String, a: &Value, b: &Value) -> Value {
    if a.is_safe() && b.is_safe() {
        Value::from_safe_string(text)
    } else {
        Value::from(text)
    }
}

/// `a + b`: strings charged before they are joined; two sequences refused when together
/// they hold more items than the budget left; numbers as minijinja adds them.
pub(crate) fn add(state: &State, a: Value, b: Value) -> Result<Value, Error> {
    if let (Some(x), Some(y)) = (a.as_str(), b.as_str()) {
        charge_bytes(state, (x.len() + y.len()) as u64)?;
        return Ok(joined([x, y].concat(), &a, &b));
    } else if is_sequence(&a) && is_sequence(&b) {
        let cap = items_left(state);
        if items_upto(&a, cap).saturating_add(items_upto(&b, cap)) > cap {
            return Err(out_of_fuel(format!(
                "`+` would make a sequence of more than {cap} items"
            )));
        }
    }
    minijinja_op(&PLUS, a, b)
}

/// `a * b`: a sequence repeated into more items than the budget left, or a string into
/// more bytes, is refused before minijinja makes it.
pub(crate) fn mul(state: &State, a: Value, b: Value) -> Result<Value, Error> {
    let count = |v: &Value| v.as_i64().map_or(0, |n| n.max(0) as u64);
    let (seq_or_str, n) = if is_sequence(&a) || a.as_str().is_some() {
        (&a, count(&b))
    } else {
        (&b, count(&a))
    };
    if let Some(s) = seq_or_str.as_str() {
        charge_bytes(state, (s.len() as u64).saturating_mul(n))?;
    } else if is_sequence(seq_or_str) {
        let cap = items_left(state);
        if items_upto(seq_or_str, cap).saturating_mul(n) > cap {
            return Err(out_of_fuel(format!(
                "`*` would make a sequence of more than {cap} items"
            )));
        }
    }
    minijinja_op(&TIMES, a, b)
}

/// `a ~ b`: both sides turned into text within the budget left, then joined (a safe
/// string only when both sides are).
pub(crate) fn concat(state: &State, a: Value, b: Value) -> Result<Value, Error> {
    let mut text = String::new();
    let left = bytes_left(state);
    let used = write_capped(&mut text, &a, left)?;
    write_capped(&mut text, &b, left - used)?;
    charge_bytes(state, text.len() as u64)?;
    Ok(joined(text, &a, &b))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn values_turned_into_text_stop_at_their_byte_and_item_caps() {
        let list = Value::from((0..10).collect::<Vec<i32>>());
        let mut text = String::new();
        assert_eq!(write_capped(&mut text, &list, 1000).unwrap(), 30);
        assert_eq!(text, "[0, 1, 2, 3, 4, 5, 6, 7, 8, 9]");
        // 30 bytes do not fit in 29.
        let e = write_capped(&mut String::new(), &list, 29).unwrap_err();
        assert_eq!(e.kind(), ErrorKind::OutOfFuel);
        // More items than the bytes could print is refused before printing any.
        let mut text = String::new();
        let e = write_capped(&mut text, &list, 19).unwrap_err();
        assert_eq!(e.kind(), ErrorKind::OutOfFuel);
        assert!(text.is_empty());
        // Nested items count, up to the budget.
        let nested = Value::from(vec![Value::from(vec![1, 2, 3]), Value::from(vec![4])]);
        let mut budget = 6;
        assert!(!too_many_items(&nested, &mut budget));
        assert_eq!(budget, 0);
        let mut budget = 5;
        assert!(too_many_items(&nested, &mut budget));
        // Strings and numbers are not containers.
        assert!(!too_many_items(&Value::from("abc"), &mut 0));
    }

    #[test]
    fn folded_repeats_are_found_by_line_and_products_pass() {
        let syntax = minijinja::syntax::SyntaxConfig::default();
        let check = |t: &str| check_folded_repeats(t, syntax.clone());
        assert_eq!(check("a\n{{ [1] * 3 }}"), Err("line 2".into()));
        assert_eq!(check("{{ 3 * (1,) }}"), Err("line 1".into()));
        assert_eq!(check("{{ (2) * 3 }}"), Err("line 1".into()));
        for ok in [
            "{{ 2 * 3 }}",
            "{{ '-' * 3 }}",
            "{{ a * b }}",
            "{{ x ** 2 }}",
            "[1] * 3",
        ] {
            assert_eq!(check(ok), Ok(()), "{ok}");
        }
    }
}
