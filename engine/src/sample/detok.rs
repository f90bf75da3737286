//! Token ids back to text while streaming: [`IncrementalDecoder`] emits only whole UTF-8,
//! [`StopStrings`] holds back text that might start a stop string.

use tokenizers::Tokenizer;

use crate::error::{Error, Result};

/// Turns a growing list of token ids into text pieces that are always whole UTF-8.
///
/// Decodes a short window of recent tokens twice (with and without the newest ones) and
/// emits the difference once it no longer ends in U+FFFD, the replacement character a
/// byte-level decoder produces for an unfinished character. The window keeps the
/// decoder's context (leading spaces, merges) right. Idea from Hugging Face TGI.
pub struct IncrementalDecoder<'t> {
    tokenizer: &'t Tokenizer,
    ids: Vec<u32>,
    prefix_offset: usize,
    read_offset: usize,
    skip_special_tokens: bool,
}

impl<'t> IncrementalDecoder<'t> {
    pub fn new(tokenizer: &'t Tokenizer, skip_special_tokens: bool) -> Self {
        IncrementalDecoder {
            tokenizer,
            ids: Vec::new(),
            prefix_offset: 0,
            read_offset: 0,
            skip_special_tokens,
        }
    }

    fn decode(&self, ids: &[u32]) -> Result<String> {
        self.tokenizer
            .decode(ids, self.skip_special_tokens)
            .map_err(|e| Error::TokenizerRun(format!("decoding {ids:?}: {e}")))
    }

    /// Add one token; return the text it completes (possibly empty).
    pub fn push(&mut self, id: u32) -> Result<String> {
        self.ids.push(id);
        let prefix = self.decode(&self.ids[self.prefix_offset..self.read_offset])?;
        let full = self.decode(&self.ids[self.prefix_offset..])?;
        if full.len() > prefix.len() && !full.ends_with('\u{FFFD}') {
            let piece = match full.get(prefix.len()..) {
                Some(p) if full.starts_with(&prefix) => p.to_string(),
                // The window re-decoded differently: emit what is new by characters.
                _ => full.chars().skip(prefix.chars().count()).collect(),
            };
            self.prefix_offset = self.read_offset;
            self.read_offset = self.ids.len();
            Ok(piece)
        } else {
            Ok(String::new())
        }
    }

    /// Text still held back (an unfinished character at the very end), lossily decoded.
    pub fn flush(&mut self) -> Result<String> {
        let prefix = self.decode(&self.ids[self.prefix_offset..self.read_offset])?;
        let full = self.decode(&self.ids[self.prefix_offset..])?;
        self.prefix_offset = self.ids.len();
        self.read_offset = self.ids.len();
        Ok(full
            .get(prefix.len()..)
            .map(str::to_string)
            .unwrap_or_default())
    }
}

/// Streams text while watching for stop strings.
///
/// Invariant: text handed out never contains a stop string nor anything after one, and
/// only text that cannot be the start of a stop string is handed out before the end.
#[derive(Debug, Clone, Default)]
pub struct StopStrings {
    stops: Vec<String>,
    /// All accepted text so far (cut at a stop string once one is found).
    text: String,
    /// Bytes of `text` already handed out.
    emitted: usize,
    stopped: bool,
}

impl StopStrings {
    pub fn new(stops: Vec<String>) -> Self {
        StopStrings {
            stops: stops.into_iter().filter(|s| !s.is_empty()).collect(),
            ..Default::default()
        }
    }

    /// Whether a stop string has been seen.
    pub fn stopped(&self) -> bool {
        self.stopped
    }

    /// All text accepted so far (without the stop string).
    pub fn text(&self) -> &str {
        &self.text
    }

    /// Add a piece of text; return what may be shown now.
    pub fn push(&mut self, piece: &str) -> String {
        if self.stopped {
            return String::new();
        }
        let longest = self.stops.iter().map(String::len).max().unwrap_or(0);
        // A new match must end inside `piece`, so it starts at most `longest` bytes back.
        let mut search_from = self.text.len().saturating_sub(longest);
        self.text.push_str(piece);
        while !self.text.is_char_boundary(search_from) {
            search_from -= 1;
        }
        let found = self
            .stops
            .iter()
            .filter_map(|s| {
                self.text[search_from..]
                    .find(s.as_str())
                    .map(|p| search_from + p)
            })
            .min();
        if let Some(pos) = found {
            self.text.truncate(pos);
            self.stopped = true;
            return self.take(pos);
        }
        // Hold back the longest suffix that is a proper prefix of some stop string.
        let mut safe_end = self.text.len();
        for s in &self.stops {
            for n in (1..s.len()).rev() {
                let start = self.text.len().saturating_sub(n);
                if n <= self.text.len()
                    && self.text.is_char_boundary(start)
                    && s.is_char_boundary(n)
                    && self.text[start..] == s[..n]
                {
                    safe_end = safe_end.min(start);
                    break;
                }
            }
        }
        self.take(safe_end.max(self.emitted))
    }

    /// Hand out everything still held back (at the end of generation).
    pub fn finish(&mut self) -> String {
        let end = self.text.len();
        self.take(end)
    }

    fn take(&mut self, end: usize) -> String {
        let out = self.text[self.emitted..end].to_string();
        self.emitted = end;
        out
    }
}
