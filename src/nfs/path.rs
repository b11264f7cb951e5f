//! Validation of paths inside an export. Pure: no I/O, so every rule is unit-tested.
//!
//! A path is relative to the export root and made of plain names joined by `/`. Anything that could
//! step outside the export or mean two things (`..`, `.`, empty components, a leading `/`) is refused
//! rather than normalised: the callers build these paths themselves, so an odd one is a bug to surface.

/// The longest name NFSv3 servers commonly accept (NAME_MAX on Linux).
pub const MAX_NAME_LEN: usize = 255;

/// Splits `path` into its names; `""` and `"."` are the export root (no names).
pub fn components(path: &str) -> Result<Vec<&str>, &'static str> {
    if path.is_empty() || path == "." {
        return Ok(Vec::new());
    }
    if path.starts_with('/') {
        return Err("absolute paths are not allowed; paths are relative to the export root");
    }
    path.split('/')
        .map(|name| check_name(name).map(|()| name))
        .collect()
}

/// Splits `path` into the names of its parent directory and its last name. The root has no last name.
pub fn parent_and_name(path: &str) -> Result<(Vec<&str>, &str), &'static str> {
    let mut names = components(path)?;
    match names.pop() {
        Some(last) => Ok((names, last)),
        None => Err("the export root has no parent; name something inside it"),
    }
}

/// Checks one name (a single path component).
pub fn check_name(name: &str) -> Result<(), &'static str> {
    match name {
        "" => Err("empty path component (a doubled, leading or trailing '/')"),
        "." => Err("'.' components are not allowed"),
        ".." => Err("'..' components are not allowed: they could leave the export"),
        _ if name.contains('/') => Err("a name must not contain '/'"),
        _ if name.contains('\0') => Err("a name must not contain a NUL byte"),
        _ if name.len() > MAX_NAME_LEN => Err("a name is longer than 255 bytes"),
        _ => Ok(()),
    }
}

/// Joins a directory path and a name into a path, for messages and recursion.
pub fn join(dir: &str, name: &str) -> String {
    if dir.is_empty() || dir == "." {
        name.to_owned()
    } else {
        format!("{dir}/{name}")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn plain_paths_split_into_names() {
        assert_eq!(components("").unwrap(), Vec::<&str>::new());
        assert_eq!(components(".").unwrap(), Vec::<&str>::new());
        assert_eq!(components("vol").unwrap(), vec!["vol"]);
        assert_eq!(
            components(".ferry/hosts/h1").unwrap(),
            vec![".ferry", "hosts", "h1"]
        );
        assert_eq!(
            components("a b/..c/c..").unwrap(),
            vec!["a b", "..c", "c.."]
        );
    }

    #[test]
    fn escaping_and_ambiguous_paths_are_refused() {
        for bad in [
            "/",
            "/etc",
            "/export/vol",
            "..",
            "../x",
            "a/../b",
            "a/..",
            "a//b",
            "a/",
            "//a",
            "./a",
            "a/./b",
            "a\0b",
        ] {
            assert!(components(bad).is_err(), "{bad:?} was accepted");
        }
        assert!(components(&"x".repeat(256)).is_err());
        assert!(components(&"x".repeat(255)).is_ok());
        assert!(components("..").unwrap_err().contains("leave the export"));
        assert!(components("/etc")
            .unwrap_err()
            .contains("relative to the export root"));
    }

    #[test]
    fn names_are_single_components() {
        assert!(check_name("host-1.marker").is_ok());
        for bad in ["", ".", "..", "a/b", "a\0"] {
            assert!(check_name(bad).is_err(), "{bad:?} was accepted");
        }
    }

    #[test]
    fn parent_and_name_of_a_path() {
        assert_eq!(parent_and_name("vol").unwrap(), (vec![], "vol"));
        assert_eq!(parent_and_name("a/b/c").unwrap(), (vec!["a", "b"], "c"));
        assert!(parent_and_name("").is_err());
        assert!(parent_and_name("a/..").is_err());
    }

    #[test]
    fn join_keeps_the_root_implicit() {
        assert_eq!(join("", "a"), "a");
        assert_eq!(join(".", "a"), "a");
        assert_eq!(join("a/b", "c"), "a/b/c");
    }
}
