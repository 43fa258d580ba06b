//! Names of things: [`TypeName`] (`namespace/name`) and [`Address`] (type + id).
//!
//! Why it exists: every function, message type, state type and egress is named by a
//! `TypeName`, and every function instance is reached through an `Address`. Both are
//! cloned on every message, so both are cheap to clone: a `TypeName` built with
//! [`TypeName::from_static`] is a `&'static str` (usable in `const` items), one parsed at
//! run time shares an `Arc<str>`.
//!
//! Invariant: a `TypeName` always holds a valid name: non-empty namespace and name
//! separated by the *last* `/`, no whitespace or control characters. This matches
//! StateFun, where `type.googleapis.com/foo.Bar` has namespace `type.googleapis.com`.

use std::borrow::Borrow;
use std::fmt;
use std::hash::{Hash, Hasher};
use std::sync::Arc;

/// Why a string is not a valid [`TypeName`] or [`Address`] id.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum NameError {
    /// There is no `/` separating namespace and name.
    #[error("type name {0:?} has no '/': expected 'namespace/name'")]
    MissingSlash(String),
    /// The namespace (before the last `/`) is empty.
    #[error("type name {0:?} has an empty namespace")]
    EmptyNamespace(String),
    /// The name (after the last `/`) is empty.
    #[error("type name {0:?} has an empty name after the last '/'")]
    EmptyName(String),
    /// Whitespace or a control character appears in the name.
    #[error("type name {0:?} contains whitespace or a control character")]
    InvalidCharacter(String),
    /// The name is longer than [`TypeName::MAX_LEN`] bytes.
    #[error("type name is {0} bytes long; the limit is {max}", max = TypeName::MAX_LEN)]
    TooLong(usize),
    /// An address id is empty.
    #[error("address id must not be empty")]
    EmptyId,
}

#[derive(Clone)]
enum Repr {
    Static(&'static str),
    Shared(Arc<str>),
}

/// A validated `namespace/name` pair naming a function type, a value type or an egress.
///
/// ```
/// use statefun_sdk::TypeName;
/// const GREETER: TypeName = TypeName::from_static("com.example/greeter");
/// assert_eq!(GREETER.namespace(), "com.example");
/// assert_eq!(GREETER.name(), "greeter");
/// let parsed = TypeName::parse("com.example/greeter").unwrap();
/// assert_eq!(parsed, GREETER);
/// assert!(TypeName::parse("no-slash").is_err());
/// ```
#[derive(Clone)]
pub struct TypeName {
    repr: Repr,
    /// Byte index of the last `/`.
    split: u32,
}

/// Result of validating a candidate name: `Ok(split index)` or the reason.
const fn check(s: &str) -> Result<u32, u8> {
    let b = s.as_bytes();
    if b.len() > TypeName::MAX_LEN {
        return Err(4);
    }
    let mut i = 0;
    let mut last_slash: i64 = -1;
    while i < b.len() {
        let c = b[i];
        if c <= b' ' || c == 0x7f {
            return Err(3);
        }
        if c == b'/' {
            last_slash = i as i64;
        }
        i += 1;
    }
    if last_slash < 0 {
        return Err(0);
    }
    if last_slash == 0 {
        return Err(1);
    }
    if last_slash as usize == b.len() - 1 {
        return Err(2);
    }
    Ok(last_slash as u32)
}

impl TypeName {
    /// Longest accepted type name, in bytes.
    pub const MAX_LEN: usize = 1024;

    /// Builds a type name from a string constant; usable in `const` items.
    ///
    /// # Panics
    /// If `s` is not a valid type name (at compile time when used in a `const`). Use
    /// [`TypeName::parse`] for names that come from input.
    pub const fn from_static(s: &'static str) -> TypeName {
        match check(s) {
            Ok(split) => TypeName {
                repr: Repr::Static(s),
                split,
            },
            Err(_) => panic!("invalid TypeName literal: expected 'namespace/name' without whitespace"),
        }
    }

    /// Parses and validates a type name from input.
    pub fn parse(s: &str) -> Result<TypeName, NameError> {
        match check(s) {
            Ok(split) => Ok(TypeName {
                repr: Repr::Shared(Arc::from(s)),
                split,
            }),
            Err(0) => Err(NameError::MissingSlash(s.to_owned())),
            Err(1) => Err(NameError::EmptyNamespace(s.to_owned())),
            Err(2) => Err(NameError::EmptyName(s.to_owned())),
            Err(3) => Err(NameError::InvalidCharacter(s.to_owned())),
            Err(_) => Err(NameError::TooLong(s.len())),
        }
    }

    /// Builds a type name from its two parts (as StateFun's protocol carries them).
    pub fn from_parts(namespace: &str, name: &str) -> Result<TypeName, NameError> {
        if name.contains('/') {
            return Err(NameError::InvalidCharacter(format!("{namespace}/{name}")));
        }
        TypeName::parse(&format!("{namespace}/{name}"))
    }

    /// The whole name, `namespace/name`.
    pub fn as_str(&self) -> &str {
        match &self.repr {
            Repr::Static(s) => s,
            Repr::Shared(s) => s,
        }
    }

    /// The part before the last `/`.
    pub fn namespace(&self) -> &str {
        &self.as_str()[..self.split as usize]
    }

    /// The part after the last `/`.
    pub fn name(&self) -> &str {
        &self.as_str()[self.split as usize + 1..]
    }
}

impl PartialEq for TypeName {
    fn eq(&self, other: &Self) -> bool {
        // Fast path: the same constant or the same shared allocation.
        let same = match (&self.repr, &other.repr) {
            (Repr::Static(a), Repr::Static(b)) => std::ptr::eq(*a, *b),
            (Repr::Shared(a), Repr::Shared(b)) => Arc::ptr_eq(a, b),
            _ => false,
        };
        same || self.as_str() == other.as_str()
    }
}
impl Eq for TypeName {}
impl Hash for TypeName {
    fn hash<H: Hasher>(&self, state: &mut H) {
        self.as_str().hash(state)
    }
}
impl PartialOrd for TypeName {
    fn partial_cmp(&self, other: &Self) -> Option<std::cmp::Ordering> {
        Some(self.cmp(other))
    }
}
impl Ord for TypeName {
    fn cmp(&self, other: &Self) -> std::cmp::Ordering {
        self.as_str().cmp(other.as_str())
    }
}
impl fmt::Display for TypeName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}
impl fmt::Debug for TypeName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "TypeName({})", self.as_str())
    }
}
impl std::str::FromStr for TypeName {
    type Err = NameError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        TypeName::parse(s)
    }
}
impl Borrow<str> for TypeName {
    fn borrow(&self) -> &str {
        self.as_str()
    }
}
impl serde::Serialize for TypeName {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(self.as_str())
    }
}
impl<'de> serde::Deserialize<'de> for TypeName {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        TypeName::parse(&s).map_err(serde::de::Error::custom)
    }
}

/// The identity of one function instance: its function type and an id within the type.
///
/// The id is any non-empty string (a SKU, a basket id, a customer id). Messages to the
/// same address are processed one at a time, in order; the address's state is private
/// to it. Cloning is cheap (two reference-count increments at most).
#[derive(Clone)]
pub struct Address {
    type_name: TypeName,
    id: Arc<str>,
}

impl PartialEq for Address {
    fn eq(&self, other: &Self) -> bool {
        // Fast path: clones of one address share the id allocation.
        (Arc::ptr_eq(&self.id, &other.id) || self.id == other.id) && self.type_name == other.type_name
    }
}
impl Eq for Address {}
impl Hash for Address {
    fn hash<H: Hasher>(&self, state: &mut H) {
        self.type_name.hash(state);
        self.id.hash(state);
    }
}
impl PartialOrd for Address {
    fn partial_cmp(&self, other: &Self) -> Option<std::cmp::Ordering> {
        Some(self.cmp(other))
    }
}
impl Ord for Address {
    fn cmp(&self, other: &Self) -> std::cmp::Ordering {
        (&self.type_name, &*self.id).cmp(&(&other.type_name, &*other.id))
    }
}

impl Address {
    /// Builds an address; fails when `id` is empty.
    pub fn new(type_name: TypeName, id: impl AsRef<str>) -> Result<Address, NameError> {
        let id = id.as_ref();
        if id.is_empty() {
            return Err(NameError::EmptyId);
        }
        Ok(Address {
            type_name,
            id: Arc::from(id),
        })
    }

    /// The function type.
    pub fn type_name(&self) -> &TypeName {
        &self.type_name
    }

    /// The id within the function type.
    pub fn id(&self) -> &str {
        &self.id
    }
}

impl fmt::Display for Address {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.type_name, self.id)
    }
}
impl fmt::Debug for Address {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Address({}, {:?})", self.type_name, self.id)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn splits_at_the_last_slash_like_statefun() {
        let t = TypeName::parse("type.googleapis.com/a/b.C").unwrap();
        assert_eq!(t.namespace(), "type.googleapis.com/a");
        assert_eq!(t.name(), "b.C");
    }

    #[test]
    fn rejects_each_kind_of_invalid_name_with_its_own_reason() {
        assert!(matches!(TypeName::parse("abc"), Err(NameError::MissingSlash(_))));
        assert!(matches!(TypeName::parse("/abc"), Err(NameError::EmptyNamespace(_))));
        assert!(matches!(TypeName::parse("abc/"), Err(NameError::EmptyName(_))));
        assert!(matches!(TypeName::parse("a b/c"), Err(NameError::InvalidCharacter(_))));
        assert!(matches!(TypeName::parse("a/\n"), Err(NameError::InvalidCharacter(_))));
        let long = format!("a/{}", "x".repeat(TypeName::MAX_LEN));
        assert!(matches!(TypeName::parse(&long), Err(NameError::TooLong(_))));
    }

    #[test]
    fn static_and_parsed_names_are_equal_and_hash_equal() {
        use std::collections::HashSet;
        const T: TypeName = TypeName::from_static("ns/fn");
        let mut set = HashSet::new();
        set.insert(T);
        assert!(set.contains(&TypeName::parse("ns/fn").unwrap()));
    }

    #[test]
    #[should_panic(expected = "invalid TypeName literal")]
    fn from_static_panics_on_a_bad_literal() {
        let _ = TypeName::from_static("bad");
    }

    #[test]
    fn empty_address_id_is_rejected() {
        let t = TypeName::from_static("ns/fn");
        assert_eq!(Address::new(t, ""), Err(NameError::EmptyId));
    }

    proptest! {
        #[test]
        fn parse_then_parts_round_trip(ns in "[a-z.]{1,12}(/[a-z]{1,5})?", name in "[A-Za-z0-9_.-]{1,12}") {
            let t = TypeName::from_parts(&ns, &name).unwrap();
            prop_assert_eq!(t.namespace(), ns.as_str());
            prop_assert_eq!(t.name(), name.as_str());
            prop_assert_eq!(TypeName::parse(t.as_str()).unwrap(), t);
        }
    }
}
