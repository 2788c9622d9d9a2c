//! Tokens of the IoT Hub query language (PROTOCOL §14.1), each with the 1-based character
//! position it starts at, so parse errors can name where the query went wrong.

use super::QueryError;

#[derive(Debug, Clone, PartialEq)]
pub enum Tok {
    /// A name: keyword, function or path segment (letters, digits, `_`, `$`).
    Ident(String),
    /// `[[id]]`: a path segment that may hold any character but `]`, as configuration ids.
    Bracketed(String),
    Str(String),
    Num(f64),
    Star,
    Comma,
    Dot,
    LParen,
    RParen,
    LBracket,
    RBracket,
    Eq,
    Ne,
    Lt,
    Gt,
    Le,
    Ge,
    End,
}

impl Tok {
    /// How the token reads in an error message.
    pub fn describe(&self) -> String {
        match self {
            Tok::Ident(s) => format!("'{s}'"),
            Tok::Bracketed(s) => format!("'[[{s}]]'"),
            Tok::Str(s) => format!("string '{s}'"),
            Tok::Num(n) => format!("number {n}"),
            Tok::Star => "'*'".into(),
            Tok::Comma => "','".into(),
            Tok::Dot => "'.'".into(),
            Tok::LParen => "'('".into(),
            Tok::RParen => "')'".into(),
            Tok::LBracket => "'['".into(),
            Tok::RBracket => "']'".into(),
            Tok::Eq => "'='".into(),
            Tok::Ne => "'!='".into(),
            Tok::Lt => "'<'".into(),
            Tok::Gt => "'>'".into(),
            Tok::Le => "'<='".into(),
            Tok::Ge => "'>='".into(),
            Tok::End => "the end of the query".into(),
        }
    }
}

/// A token and the 1-based character position where it starts.
#[derive(Debug, Clone, PartialEq)]
pub struct Spanned {
    pub tok: Tok,
    pub pos: usize,
}

fn is_ident_char(c: char) -> bool {
    c.is_alphanumeric() || c == '_' || c == '$'
}

/// Splits `text` into tokens; the last one is always [`Tok::End`].
pub fn tokenize(text: &str) -> Result<Vec<Spanned>, QueryError> {
    let chars: Vec<char> = text.chars().collect();
    let mut out = Vec::new();
    let mut i = 0;
    while i < chars.len() {
        let c = chars[i];
        let pos = i + 1;
        if c.is_whitespace() {
            i += 1;
            continue;
        }
        let single = match c {
            '*' => Some(Tok::Star),
            ',' => Some(Tok::Comma),
            '.' if !chars.get(i + 1).is_some_and(char::is_ascii_digit) => Some(Tok::Dot),
            '(' => Some(Tok::LParen),
            ')' => Some(Tok::RParen),
            ']' => Some(Tok::RBracket),
            '=' => Some(Tok::Eq),
            _ => None,
        };
        if let Some(tok) = single {
            out.push(Spanned { tok, pos });
            i += 1;
            continue;
        }
        let next = chars.get(i + 1).copied();
        let (tok, len) = match c {
            '[' if next == Some('[') => bracketed(&chars, i)?,
            '[' => (Tok::LBracket, 1),
            '!' if next == Some('=') => (Tok::Ne, 2),
            '<' if next == Some('>') => (Tok::Ne, 2),
            '<' if next == Some('=') => (Tok::Le, 2),
            '<' => (Tok::Lt, 1),
            '>' if next == Some('=') => (Tok::Ge, 2),
            '>' => (Tok::Gt, 1),
            '\'' | '"' => string(&chars, i)?,
            c if c.is_ascii_digit() || c == '.' || c == '-' => number(&chars, i)?,
            c if is_ident_char(c) => {
                let end = (i..chars.len())
                    .find(|&j| !is_ident_char(chars[j]))
                    .unwrap_or(chars.len());
                (Tok::Ident(chars[i..end].iter().collect()), end - i)
            }
            other => {
                return Err(QueryError::new(
                    pos,
                    format!("unexpected character '{other}'"),
                ))
            }
        };
        out.push(Spanned { tok, pos });
        i += len;
    }
    out.push(Spanned {
        tok: Tok::End,
        pos: chars.len() + 1,
    });
    Ok(out)
}

/// `[[...]]` starting at `i`.
fn bracketed(chars: &[char], i: usize) -> Result<(Tok, usize), QueryError> {
    let start = i + 2;
    let close = (start..chars.len().saturating_sub(1))
        .find(|&j| chars[j] == ']' && chars[j + 1] == ']')
        .ok_or_else(|| QueryError::new(i + 1, "'[[' is not closed by ']]'"))?;
    if close == start {
        return Err(QueryError::new(i + 1, "'[[]]' names nothing"));
    }
    Ok((
        Tok::Bracketed(chars[start..close].iter().collect()),
        close + 2 - i,
    ))
}

/// A quoted string starting at `i`; the quote is doubled or backslash-escaped inside.
fn string(chars: &[char], i: usize) -> Result<(Tok, usize), QueryError> {
    let quote = chars[i];
    let mut s = String::new();
    let mut j = i + 1;
    loop {
        match chars.get(j) {
            None => {
                return Err(QueryError::new(
                    i + 1,
                    "string literal is not closed".to_string(),
                ))
            }
            Some('\\') => match chars.get(j + 1) {
                Some(&e) => {
                    s.push(match e {
                        'n' => '\n',
                        't' => '\t',
                        other => other,
                    });
                    j += 2;
                }
                None => return Err(QueryError::new(j + 1, "dangling '\\' in string literal")),
            },
            Some(&c) if c == quote => {
                if chars.get(j + 1) == Some(&quote) {
                    s.push(quote);
                    j += 2;
                } else {
                    return Ok((Tok::Str(s), j + 1 - i));
                }
            }
            Some(&c) => {
                s.push(c);
                j += 1;
            }
        }
    }
}

/// A number (optionally negative, with fraction and exponent) starting at `i`.
fn number(chars: &[char], i: usize) -> Result<(Tok, usize), QueryError> {
    let mut j = i;
    if chars[j] == '-' {
        j += 1;
    }
    let digits = |j: &mut usize| {
        let from = *j;
        while chars.get(*j).is_some_and(char::is_ascii_digit) {
            *j += 1;
        }
        *j > from
    };
    let mut any = digits(&mut j);
    if chars.get(j) == Some(&'.') {
        j += 1;
        any |= digits(&mut j);
    }
    if !any {
        return Err(QueryError::new(
            i + 1,
            format!("'{}' does not start a number", chars[i]),
        ));
    }
    if matches!(chars.get(j), Some('e' | 'E')) {
        let mut k = j + 1;
        if matches!(chars.get(k), Some('+' | '-')) {
            k += 1;
        }
        if digits(&mut k) {
            j = k;
        }
    }
    if chars.get(j).is_some_and(|&c| is_ident_char(c)) {
        return Err(QueryError::new(
            i + 1,
            "a number runs into a name; put a space or operator between them",
        ));
    }
    let text: String = chars[i..j].iter().collect();
    let n: f64 = text
        .parse()
        .map_err(|_| QueryError::new(i + 1, format!("'{text}' is not a number")))?;
    if !n.is_finite() {
        return Err(QueryError::new(i + 1, format!("'{text}' is out of range")));
    }
    Ok((Tok::Num(n), j - i))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn toks(s: &str) -> Vec<Tok> {
        tokenize(s).unwrap().into_iter().map(|t| t.tok).collect()
    }

    #[test]
    fn operators_strings_numbers_and_bracketed_ids_are_tokens() {
        assert_eq!(
            toks("a.[[cfg-1]] <> 'it''s' >= -1.5e2 != \"x\""),
            vec![
                Tok::Ident("a".into()),
                Tok::Dot,
                Tok::Bracketed("cfg-1".into()),
                Tok::Ne,
                Tok::Str("it's".into()),
                Tok::Ge,
                Tok::Num(-150.0),
                Tok::Ne,
                Tok::Str("x".into()),
                Tok::End,
            ]
        );
    }

    #[test]
    fn positions_are_one_based_characters() {
        let t = tokenize("ab  = 'é' x").unwrap();
        assert_eq!(
            t.iter().map(|s| s.pos).collect::<Vec<_>>(),
            vec![1, 5, 7, 11, 12]
        );
    }

    #[test]
    fn an_unclosed_string_or_bracket_is_an_error_with_its_position() {
        assert_eq!(tokenize("x = 'abc").unwrap_err().position, 5);
        assert_eq!(tokenize("a.[[b").unwrap_err().position, 3);
        assert_eq!(tokenize("a # b").unwrap_err().position, 3);
    }
}
