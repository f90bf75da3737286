//! Pieces shared by the tests that write tiny GGUF files.

/// GPT-2's byte-to-unicode map: the printable bytes stand for themselves, the others
/// take the code points from 256 on, in order.
fn byte_char(b: u8) -> char {
    let printable = |x: u8| (b'!'..=b'~').contains(&x) || (0xa1..=0xac).contains(&x) || x >= 0xae;
    if printable(b) {
        char::from(b)
    } else {
        let n = (0..b).filter(|&x| !printable(x)).count() as u32;
        char::from_u32(256 + n).unwrap()
    }
}

/// A byte-level vocabulary: `<|endoftext|>`, `<|im_start|>`, then the 256 bytes.
pub fn byte_vocab() -> Vec<String> {
    let mut tokens = vec!["<|endoftext|>".to_string(), "<|im_start|>".to_string()];
    tokens.extend((0..=255u8).map(|b| byte_char(b).to_string()));
    tokens
}
