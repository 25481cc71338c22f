//! `/proc/self/mountinfo`, parsed into values (proc(5)). A pure parser: text in, typed entries
//! or a typed error out, no I/O. The mounter reads the file; this module only understands it.

use std::path::PathBuf;

/// One line of mountinfo.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct MountEntry {
    pub mount_id: u32,
    pub parent_id: u32,
    pub major: u32,
    pub minor: u32,
    /// The directory of the source filesystem that forms this mount's root (`/` for a whole
    /// filesystem; a subdirectory for a bind mount of one).
    pub root: PathBuf,
    pub mount_point: PathBuf,
    /// Per-mount options (`rw`, `nosuid`, `nodev`, ...).
    pub options: Vec<String>,
    pub fs_type: String,
    pub source: String,
    pub super_options: Vec<String>,
}

impl MountEntry {
    pub fn read_only(&self) -> bool {
        self.options.iter().any(|o| o == "ro")
    }

    pub fn has_option(&self, option: &str) -> bool {
        self.options.iter().any(|o| o == option)
    }
}

#[derive(Debug, PartialEq, Eq, thiserror::Error)]
#[error("mountinfo line {line}: {reason}")]
pub struct ParseError {
    pub line: usize,
    pub reason: String,
}

/// Parses the whole file. Empty lines are skipped; any malformed line is an error, because a
/// mount table we only half understand must not drive decisions.
pub fn parse(text: &str) -> Result<Vec<MountEntry>, ParseError> {
    text.lines()
        .enumerate()
        .filter(|(_, l)| !l.trim().is_empty())
        .map(|(i, l)| {
            parse_line(l).map_err(|reason| ParseError {
                line: i + 1,
                reason,
            })
        })
        .collect()
}

/// Parses one line:
/// `36 35 98:0 /mnt1 /mnt2 rw,noatime master:1 - ext3 /dev/root rw,errors=continue`.
pub fn parse_line(line: &str) -> Result<MountEntry, String> {
    let fields: Vec<&str> = line.split(' ').collect();
    let sep = fields
        .iter()
        .position(|f| *f == "-")
        .ok_or("no ' - ' separator")?;
    if sep < 6 {
        return Err(format!(
            "{sep} fields before the separator, need at least 6"
        ));
    }
    if fields.len() < sep + 4 {
        return Err("fewer than 3 fields after the separator".into());
    }
    let number = |name: &str, raw: &str| {
        raw.parse::<u32>()
            .map_err(|_| format!("{name} {raw:?} is not a number"))
    };
    let (major, minor) = fields[2]
        .split_once(':')
        .ok_or_else(|| format!("device {:?} is not major:minor", fields[2]))?;
    let list = |raw: &str| raw.split(',').map(unescape).collect::<Vec<_>>();
    Ok(MountEntry {
        mount_id: number("mount id", fields[0])?,
        parent_id: number("parent id", fields[1])?,
        major: number("major", major)?,
        minor: number("minor", minor)?,
        root: PathBuf::from(unescape(fields[3])),
        mount_point: PathBuf::from(unescape(fields[4])),
        options: list(fields[5]),
        fs_type: unescape(fields[sep + 1]),
        source: unescape(fields[sep + 2]),
        super_options: list(&fields[sep + 3..].join(" ")),
    })
}

/// Undoes the kernel's octal escapes (`\040` space, `\011` tab, `\012` newline, `\134`
/// backslash). Anything that is not a valid escape is kept as it is.
pub fn unescape(raw: &str) -> String {
    let bytes = raw.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'\\' && i + 4 <= bytes.len() {
            let digits = &bytes[i + 1..i + 4];
            if digits.iter().all(|d| (b'0'..=b'7').contains(d)) {
                let value = digits
                    .iter()
                    .fold(0u32, |acc, d| acc * 8 + u32::from(d - b'0'));
                if let Ok(byte) = u8::try_from(value) {
                    out.push(byte);
                    i += 4;
                    continue;
                }
            }
        }
        out.push(bytes[i]);
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// The kernel's escaping of a path in mountinfo (the inverse of [`unescape`]); for tests and
/// fakes.
pub fn escape(raw: &str) -> String {
    let mut out = String::with_capacity(raw.len());
    for c in raw.chars() {
        match c {
            ' ' => out.push_str("\\040"),
            '\t' => out.push_str("\\011"),
            '\n' => out.push_str("\\012"),
            '\\' => out.push_str("\\134"),
            c => out.push(c),
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn parses_the_proc5_example_and_real_lines() {
        let e = parse_line(
            "36 35 98:0 /mnt1 /mnt2 rw,noatime master:1 - ext3 /dev/root rw,errors=continue",
        )
        .unwrap();
        assert_eq!((e.mount_id, e.parent_id, e.major, e.minor), (36, 35, 98, 0));
        assert_eq!(e.root, PathBuf::from("/mnt1"));
        assert_eq!(e.mount_point, PathBuf::from("/mnt2"));
        assert_eq!(e.options, vec!["rw", "noatime"]);
        assert_eq!(e.fs_type, "ext3");
        assert_eq!(e.source, "/dev/root");
        assert_eq!(e.super_options, vec!["rw", "errors=continue"]);
        assert!(!e.read_only());

        let no_optional =
            parse_line("812 27 7:3 / /tmp/a\\040b ro,nosuid,nodev,relatime - ext4 /dev/loop3 ro")
                .unwrap();
        assert_eq!(no_optional.mount_point, PathBuf::from("/tmp/a b"));
        assert!(no_optional.read_only() && no_optional.has_option("nodev"));
        assert_eq!((no_optional.major, no_optional.minor), (7, 3));
    }

    #[test]
    fn malformed_lines_are_errors_naming_the_line() {
        let err = parse("22 27 0:21 / /proc rw - proc proc rw\nnonsense\n").unwrap_err();
        assert_eq!(err.line, 2);
        assert!(parse_line("1 2 x:y / /a rw - ext4 /dev/x rw").is_err());
        assert!(parse_line("1 2 7:1 / /a rw - ext4").is_err());
        assert!(parse_line("1 2 7:1 / - ext4 /dev/x rw").is_err());
        assert_eq!(parse("\n\n").unwrap(), vec![]);
    }

    #[test]
    fn unescape_keeps_what_is_not_an_escape() {
        assert_eq!(unescape("a\\040b\\134c"), "a b\\c");
        assert_eq!(unescape("a\\04"), "a\\04");
        assert_eq!(unescape("a\\999"), "a\\999");
        assert_eq!(unescape("\\"), "\\");
    }

    proptest! {
        #[test]
        fn any_mount_point_round_trips(point in "/[ -~\t\n]{0,40}", root in "/[a-z ]{0,10}") {
            let line = format!("100 1 7:12 {} {} rw,nosuid shared:5 - ext4 /dev/loop12 rw", escape(&root), escape(&point));
            let e = parse_line(&line).unwrap();
            prop_assert_eq!(e.mount_point, PathBuf::from(&point));
            prop_assert_eq!(e.root, PathBuf::from(&root));
        }

        #[test]
        fn random_text_never_panics(text in "\\PC{0,200}") {
            let _ = parse(&text);
        }
    }
}
