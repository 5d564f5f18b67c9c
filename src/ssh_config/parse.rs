//! The lexical part of ssh_config: one line into a keyword and its arguments, `Host` patterns
//! and pattern lists, as OpenSSH's `readconf.c`, `argv_split` and `match.c` do.

/// One line split into its keyword (lowercased) and arguments (quotes removed).
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) struct Line {
    pub(super) keyword: String,
    /// The keyword as written, for error messages.
    pub(super) written: String,
    pub(super) args: Vec<String>,
}

/// Splits one line. `Ok(None)` for blank lines and comments; `Err` says what is malformed.
///
/// `Keyword value`, `Keyword=value` and `Keyword = value` are the same. Arguments are split on
/// whitespace; `"..."` and `'...'` quote (also inside a word), a backslash escapes a quote, a
/// backslash or a space; a word starting with `#` starts a comment.
pub(super) fn split_line(line: &str) -> Result<Option<Line>, String> {
    let line = line.trim_matches(|c: char| c.is_ascii_whitespace() || c == '\u{c}');
    if line.is_empty() || line.starts_with('#') {
        return Ok(None);
    }
    let end = line
        .find(|c: char| c.is_ascii_whitespace() || c == '=')
        .unwrap_or(line.len());
    let written = &line[..end];
    let mut rest = line[end..].trim_start_matches(|c: char| c.is_ascii_whitespace());
    if let Some(r) = rest.strip_prefix('=') {
        rest = r.trim_start_matches(|c: char| c.is_ascii_whitespace());
    }
    if written.is_empty() {
        return Err("has no keyword".to_owned());
    }
    Ok(Some(Line {
        keyword: written.to_ascii_lowercase(),
        written: written.to_owned(),
        args: split_args(rest)?,
    }))
}

fn split_args(s: &str) -> Result<Vec<String>, String> {
    let mut args = Vec::new();
    let mut chars = s.chars().peekable();
    loop {
        while chars.peek().is_some_and(|c| c.is_ascii_whitespace()) {
            chars.next();
        }
        match chars.peek() {
            None => break,
            // A comment to the end of the line.
            Some('#') => break,
            Some(_) => {}
        }
        let mut word = String::new();
        let mut quote: Option<char> = None;
        while let Some(&c) = chars.peek() {
            match (c, quote) {
                ('\\', _) => {
                    chars.next();
                    match chars.peek() {
                        Some(&n) if matches!(n, '\\' | '"' | '\'') || (n == ' ' && quote.is_none()) => {
                            word.push(n);
                            chars.next();
                        }
                        _ => word.push('\\'),
                    }
                    continue;
                }
                (q @ ('"' | '\''), None) => quote = Some(q),
                (q, Some(open)) if q == open => quote = None,
                (w, None) if w.is_ascii_whitespace() => break,
                (other, _) => word.push(other),
            }
            chars.next();
        }
        if let Some(q) = quote {
            return Err(format!("has an unterminated {q} quote"));
        }
        args.push(word);
    }
    Ok(args)
}

/// OpenSSH `match_pattern`: `*` matches any sequence, `?` one character; case-sensitive.
pub(super) fn match_pattern(s: &str, pattern: &str) -> bool {
    fn go(s: &[char], p: &[char]) -> bool {
        match p.split_first() {
            None => s.is_empty(),
            Some(('*', rest)) => (0..=s.len()).any(|i| go(&s[i..], rest)),
            Some(('?', rest)) => !s.is_empty() && go(&s[1..], rest),
            Some((c, rest)) => s.first() == Some(c) && go(&s[1..], rest),
        }
    }
    let s: Vec<char> = s.chars().collect();
    let p: Vec<char> = pattern.chars().collect();
    go(&s, &p)
}

/// OpenSSH `match_pattern_list` for a comma-separated list with `!` negation: `Some(true)` when a
/// positive pattern matches and no negated one does, `Some(false)` when a negated one matches,
/// `None` when nothing matches. With `lowercase`, `s` and the patterns compare ignoring ASCII case.
pub(super) fn match_pattern_list(s: &str, list: &str, lowercase: bool) -> Option<bool> {
    let s = if lowercase {
        s.to_ascii_lowercase()
    } else {
        s.to_owned()
    };
    let mut matched = None;
    for pattern in list.split(',') {
        let (negated, pattern) = match pattern.strip_prefix('!') {
            Some(p) => (true, p),
            None => (false, pattern),
        };
        let pattern = if lowercase {
            pattern.to_ascii_lowercase()
        } else {
            pattern.to_owned()
        };
        if match_pattern(&s, &pattern) {
            if negated {
                return Some(false);
            }
            matched = Some(true);
        }
    }
    matched
}

/// Whether a `Host` line's patterns select `host`: a positive pattern matches and no negated one
/// does. A line of negated patterns only selects nothing (as in OpenSSH).
pub(super) fn host_line_matches(host: &str, patterns: &[String]) -> bool {
    let mut active = false;
    for p in patterns {
        match p.strip_prefix('!') {
            Some(neg) if match_pattern(host, neg) => return false,
            Some(_) => {}
            None if match_pattern(host, p) => active = true,
            None => {}
        }
    }
    active
}

/// OpenSSH's yes/no flags.
pub(super) fn parse_flag(value: &str) -> Option<bool> {
    match value.to_ascii_lowercase().as_str() {
        "yes" | "true" => Some(true),
        "no" | "false" => Some(false),
        _ => None,
    }
}

/// OpenSSH's time format: `90`, `90s`, `1m30s`, `1h`, `2d`, `1w` (case-insensitive).
pub(super) fn parse_time(value: &str) -> Option<u64> {
    if value.is_empty() {
        return None;
    }
    if value.bytes().all(|b| b.is_ascii_digit()) {
        return value.parse().ok();
    }
    let mut total: u64 = 0;
    let mut digits = String::new();
    for c in value.chars() {
        if c.is_ascii_digit() {
            digits.push(c);
            continue;
        }
        let unit = match c.to_ascii_lowercase() {
            's' => 1,
            'm' => 60,
            'h' => 3600,
            'd' => 86_400,
            'w' => 604_800,
            _ => return None,
        };
        let n: u64 = digits.parse().ok()?;
        digits.clear();
        total = total.checked_add(n.checked_mul(unit)?)?;
    }
    if !digits.is_empty() {
        total = total.checked_add(digits.parse().ok()?)?;
    }
    Some(total)
}
