//! The `where` condition an operator may give a target: checked to stay one
//! expression inside the parentheses rekey puts around it, before it is
//! ever sent to the server.

/// Checks that an operator-written `where` condition stays one expression
/// inside the parentheses rekey puts around it: parentheses balance outside
/// quotes, quotes close, and there is no `;`, comment, dollar quoting or
/// escape-string constant that could end the condition early or hide text.
/// (The condition is then prepared against the table to check it means something.)
pub fn check_condition(text: &str) -> Result<(), String> {
    if text.trim().is_empty() {
        return Err("is empty".into());
    }
    if text.contains('\0') {
        return Err("contains a NUL character".into());
    }
    let chars: Vec<char> = text.chars().collect();
    let mut depth = 0i32;
    let mut i = 0;
    while i < chars.len() {
        let c = chars[i];
        let next = chars.get(i + 1).copied();
        match c {
            '\'' => {
                // The word right before the quote: `E` alone (or a number
                // ending in `e`, which PostgreSQL before 15 splits into the
                // number and `E'`) starts an escape-string constant.
                let word = chars[..i]
                    .iter()
                    .rev()
                    .take_while(|c| c.is_alphanumeric() || **c == '_')
                    .count();
                let word = &chars[i - word..i];
                if matches!(word.last(), Some('e' | 'E'))
                    && (word.len() == 1 || word[0].is_ascii_digit())
                {
                    return Err("uses an escape-string constant (E'...'); write the value as a standard string".into());
                }
                i += 1;
                loop {
                    match (chars.get(i), chars.get(i + 1)) {
                        (Some('\''), Some('\'')) => i += 2,
                        (Some('\''), _) => break,
                        (Some('\\'), _) => {
                            return Err("has a backslash inside a string: with standard_conforming_strings off, PostgreSQL reads it as an escape that can end the string elsewhere; write the value without one (chr(92) is a backslash)".into())
                        }
                        (Some(_), _) => i += 1,
                        (None, _) => return Err("has a string that is not closed".into()),
                    }
                }
            }
            '"' => {
                i += 1;
                loop {
                    match (chars.get(i), chars.get(i + 1)) {
                        (Some('"'), Some('"')) => i += 2,
                        (Some('"'), _) => break,
                        (Some(_), _) => i += 1,
                        (None, _) => {
                            return Err("has a quoted identifier that is not closed".into())
                        }
                    }
                }
            }
            '(' => depth += 1,
            ')' => {
                depth -= 1;
                if depth < 0 {
                    return Err("closes a parenthesis it did not open".into());
                }
            }
            ';' => return Err("contains ';': it must be one condition".into()),
            '-' if next == Some('-') => return Err("contains a comment (--)".into()),
            '/' if next == Some('*') => return Err("contains a comment (/*)".into()),
            '$' => {
                return Err("contains '$' (parameters and dollar quoting are not allowed)".into())
            }
            _ => {}
        }
        i += 1;
    }
    if depth != 0 {
        return Err("leaves a parenthesis open".into());
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::check_condition;
    use proptest::prelude::*;

    #[test]
    fn plain_conditions_pass() {
        for ok in [
            "id <= 100",
            "org_id = 5 AND (region = 'eu' OR region = 'it''s')",
            "\"Weird ) col\" > 3",
            "created_at > now() - interval '1 day'",
            "x1E'2024-01-01' IS NULL",
        ] {
            assert_eq!(check_condition(ok), Ok(()), "{ok}");
        }
    }

    #[test]
    fn conditions_that_could_escape_their_parentheses_are_refused() {
        for bad in [
            "true) UNION ALL SELECT 1 --",
            "1=1; DROP TABLE t",
            "id > 1 /* hidden */",
            "id > 1 -- rest",
            "name = 'open",
            "(id > 1",
            "x = $$a$$",
            "x = E'\\' ) OR (true'",
            "name = 'a\0'",
            "",
        ] {
            assert!(check_condition(bad).is_err(), "{bad}");
        }
    }

    /// With `standard_conforming_strings = off` (a server, database or role
    /// setting) PostgreSQL reads a backslash in '...' as an escape: what
    /// rekey sees as two strings, the server reads as one string, a
    /// `) OR (` outside it, and another string.
    #[test]
    fn a_backslash_in_a_string_is_refused_whatever_the_server_does_with_it() {
        for bad in [
            "id::text = '\\'' ) OR (true OR id::text = '\\''",
            "name LIKE 'a\\_b'",
        ] {
            let err = check_condition(bad).unwrap_err();
            assert!(err.contains("backslash"), "{bad}: {err}");
        }
    }

    /// A number followed by `E'...'`: PostgreSQL before 15 reads an
    /// escape-string constant there.
    #[test]
    fn an_escape_string_after_a_number_is_refused() {
        assert!(check_condition("id > 1E'x'").is_err());
        assert!(check_condition("id > 1.5e'x'").is_err());
    }

    /// Where PostgreSQL sees string literals and quoted identifiers in
    /// `text`, with or without backslash escapes in strings (its
    /// `standard_conforming_strings` off or on); `None` if one is not
    /// closed. A model of the server's lexer for the properties below.
    fn quoted_regions(text: &str, backslash_escapes: bool) -> Option<Vec<(usize, usize)>> {
        let chars: Vec<char> = text.chars().collect();
        let mut regions = Vec::new();
        let mut i = 0;
        while i < chars.len() {
            let quote = chars[i];
            if quote == '\'' || quote == '"' {
                let start = i;
                i += 1;
                loop {
                    match (chars.get(i), chars.get(i + 1)) {
                        (Some('\\'), Some(_)) if backslash_escapes && quote == '\'' => i += 2,
                        (Some(c), Some(d)) if *c == quote && *d == quote => i += 2,
                        (Some(c), _) if *c == quote => break,
                        (Some(_), _) => i += 1,
                        (None, _) => return None,
                    }
                }
                regions.push((start, i));
            }
            i += 1;
        }
        Some(regions)
    }

    /// Conditions built from the pieces that matter to the check.
    fn condition() -> impl Strategy<Value = String> {
        let pieces = vec![
            "'", "''", "\\", "\"", "(", ")", " ", "id", "=", "1", "E", "e", " OR ", ";", "-", "/",
            "*", "$", ".",
        ];
        proptest::collection::vec(prop::sample::select(pieces), 0..16).prop_map(|p| p.concat())
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(2000))]

        #[test]
        fn arbitrary_text_is_refused_with_a_reason_or_is_one_balanced_expression(text in "\\PC{0,80}") {
            match check_condition(&text) {
                Err(why) => prop_assert!(!why.is_empty()),
                Ok(()) => {
                    // accepted: quotes close, and outside them parentheses never close
                    // more than they opened and no statement separator or comment appears
                    let quoted = quoted_regions(&text, false);
                    prop_assert!(quoted.is_some(), "an open quote was accepted: {:?}", text);
                    let quoted = quoted.unwrap_or_default();
                    let (mut depth, mut previous) = (0i32, ' ');
                    for (i, c) in text.chars().enumerate() {
                        if quoted.iter().any(|&(a, b)| a <= i && i <= b) {
                            previous = ' ';
                            continue;
                        }
                        match c {
                            '(' => depth += 1,
                            ')' => depth -= 1,
                            _ => {}
                        }
                        prop_assert!(c != ';', "a ';' was accepted: {:?}", text);
                        prop_assert!(!matches!((previous, c), ('-', '-') | ('/', '*')), "a comment was accepted: {:?}", text);
                        prop_assert!(depth >= 0, "closes a parenthesis it did not open: {:?}", text);
                        previous = c;
                    }
                    prop_assert_eq!(depth, 0, "unbalanced: {:?}", text);
                }
            }
        }

        #[test]
        fn an_accepted_condition_cannot_be_extended_past_its_parentheses(text in condition(), tail in prop::sample::select(vec![") OR (true", "; DROP TABLE canary", " -- x", " /* x */", ") UNION SELECT 1 --"])) {
            if check_condition(&text).is_ok() {
                let extended = format!("{text}{tail}");
                prop_assert!(check_condition(&extended).is_err(), "accepted {:?}", extended);
            }
        }

        #[test]
        fn an_accepted_condition_lexes_the_same_whatever_the_server_does_with_backslashes(text in condition()) {
            if check_condition(&text).is_ok() {
                let strict = quoted_regions(&text, false);
                prop_assert!(strict.is_some());
                prop_assert_eq!(quoted_regions(&text, true), strict, "{:?}", text);
            }
        }
    }
}
