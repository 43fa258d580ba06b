//! Typed values: the `(type name, bytes)` envelope every message and state value travels
//! in, and the codecs that turn Rust values into it.
//!
//! Why it exists: the runtime never looks inside user values; it moves [`TypedValue`]s.
//! A Rust type becomes sendable and storable by implementing [`ValueType`], which names
//! its StateFun type and its byte encoding. Three families ship:
//!
//! * StateFun's built-in primitives (`io.statefun.types/int`, `long`, `string`, `bool`,
//!   `float`, `double`) for `i32`, `i64`, `String`, `bool`, `f32`, `f64`, encoded
//!   byte-for-byte as StateFun encodes them (protobuf wrapper messages: `int` is
//!   `sfixed32`, `long` is `sfixed64`), so remote StateFun SDKs read our values and we
//!   read theirs. `u64` is carried as `io.statefun.types/long` (two's complement);
//!   values above `i64::MAX` read back as negative numbers in other SDKs.
//! * serde JSON types, declared with [`json_type!`](crate::json_type).
//! * prost protobuf messages, declared with [`protobuf_type!`](crate::protobuf_type).

use bytes::Bytes;

use crate::typename::TypeName;

/// Why a value could not be encoded or decoded.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum CodecError {
    /// The value carries a different type name than the one asked for.
    #[error("type mismatch: expected {expected}, found {found}")]
    TypeMismatch {
        /// The type name the caller asked for.
        expected: TypeName,
        /// The type name the value carries.
        found: TypeName,
    },
    /// The bytes are not a valid encoding of the type.
    #[error("cannot decode {type_name}: {reason}")]
    Decode {
        /// The type that was being decoded.
        type_name: TypeName,
        /// What the decoder said.
        reason: String,
    },
    /// The value cannot be encoded (e.g. a JSON map with non-string keys).
    #[error("cannot encode {type_name}: {reason}")]
    Encode {
        /// The type that was being encoded.
        type_name: TypeName,
        /// What the encoder said.
        reason: String,
    },
    /// The value is absent (`has_value = false` on the wire).
    #[error("value of type {0} is absent")]
    Absent(TypeName),
}

/// A Rust type with a StateFun type name and a byte encoding.
///
/// Implement it with [`json_type!`](crate::json_type) or
/// [`protobuf_type!`](crate::protobuf_type), or by hand for a custom encoding.
pub trait ValueType: Sized {
    /// The type name carried next to the bytes.
    const TYPE_NAME: TypeName;
    /// Encodes the value.
    fn encode(&self) -> Result<Bytes, CodecError>;
    /// Decodes a value from bytes produced by [`ValueType::encode`] (or by another SDK).
    fn decode(bytes: &[u8]) -> Result<Self, CodecError>;
}

/// A value with its type name: what messages, egress records and state values are on
/// the wire (StateFun's `TypedValue`). `Message` is the same type, seen by a function.
#[derive(Clone, PartialEq, Eq)]
pub struct TypedValue {
    type_name: TypeName,
    value: Option<Bytes>,
}

/// What a function receives: a [`TypedValue`].
pub type Message = TypedValue;

impl TypedValue {
    /// Wraps already-encoded bytes.
    pub fn from_bytes(type_name: TypeName, value: impl Into<Bytes>) -> TypedValue {
        TypedValue {
            type_name,
            value: Some(value.into()),
        }
    }

    /// A value with a type but no bytes (`has_value = false` in StateFun's protocol).
    pub fn absent(type_name: TypeName) -> TypedValue {
        TypedValue { type_name, value: None }
    }

    /// Encodes a Rust value.
    pub fn of<T: ValueType>(value: &T) -> Result<TypedValue, CodecError> {
        Ok(TypedValue {
            type_name: T::TYPE_NAME,
            value: Some(value.encode()?),
        })
    }

    /// The type name.
    pub fn type_name(&self) -> &TypeName {
        &self.type_name
    }

    /// The encoded bytes, if present.
    pub fn bytes(&self) -> Option<&Bytes> {
        self.value.as_ref()
    }

    /// Whether this value carries `T`'s type name.
    pub fn is<T: ValueType>(&self) -> bool {
        self.type_name == T::TYPE_NAME
    }

    /// Decodes as `T`, checking the type name first.
    pub fn decode<T: ValueType>(&self) -> Result<T, CodecError> {
        if self.type_name != T::TYPE_NAME {
            return Err(CodecError::TypeMismatch {
                expected: T::TYPE_NAME,
                found: self.type_name.clone(),
            });
        }
        match &self.value {
            Some(b) => T::decode(b),
            None => Err(CodecError::Absent(self.type_name.clone())),
        }
    }

    /// Splits into type name and bytes.
    pub fn into_parts(self) -> (TypeName, Option<Bytes>) {
        (self.type_name, self.value)
    }
}

impl std::fmt::Debug for TypedValue {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match &self.value {
            Some(b) => write!(f, "TypedValue({}, {} bytes)", self.type_name, b.len()),
            None => write!(f, "TypedValue({}, absent)", self.type_name),
        }
    }
}

/// Encodes with serde JSON; the building block of [`json_type!`](crate::json_type).
pub fn json_encode<T: serde::Serialize>(type_name: TypeName, v: &T) -> Result<Bytes, CodecError> {
    serde_json::to_vec(v).map(Bytes::from).map_err(|e| CodecError::Encode {
        type_name,
        reason: e.to_string(),
    })
}

/// Decodes with serde JSON; the building block of [`json_type!`](crate::json_type).
pub fn json_decode<T: serde::de::DeserializeOwned>(type_name: TypeName, b: &[u8]) -> Result<T, CodecError> {
    serde_json::from_slice(b).map_err(|e| CodecError::Decode {
        type_name,
        reason: e.to_string(),
    })
}

/// Encodes a prost message; the building block of [`protobuf_type!`](crate::protobuf_type).
pub fn protobuf_encode<T: prost::Message>(v: &T) -> Bytes {
    Bytes::from(v.encode_to_vec())
}

/// Decodes a prost message; the building block of [`protobuf_type!`](crate::protobuf_type).
pub fn protobuf_decode<T: prost::Message + Default>(type_name: TypeName, b: &[u8]) -> Result<T, CodecError> {
    T::decode(b).map_err(|e| CodecError::Decode {
        type_name,
        reason: e.to_string(),
    })
}

/// Declares a serde type as a [`ValueType`] encoded as JSON under a type name.
///
/// ```
/// use statefun_sdk::{json_type, TypedValue};
/// #[derive(serde::Serialize, serde::Deserialize, Debug, PartialEq)]
/// struct Greeting { who: String }
/// json_type!(Greeting, "com.example/Greeting");
///
/// let v = TypedValue::of(&Greeting { who: "you".into() }).unwrap();
/// assert_eq!(v.type_name().as_str(), "com.example/Greeting");
/// assert_eq!(v.decode::<Greeting>().unwrap().who, "you");
/// ```
#[macro_export]
macro_rules! json_type {
    ($ty:ty, $name:literal) => {
        impl $crate::ValueType for $ty {
            const TYPE_NAME: $crate::TypeName = $crate::TypeName::from_static($name);
            fn encode(&self) -> ::std::result::Result<$crate::bytes::Bytes, $crate::CodecError> {
                $crate::value::json_encode(<Self as $crate::ValueType>::TYPE_NAME, self)
            }
            fn decode(b: &[u8]) -> ::std::result::Result<Self, $crate::CodecError> {
                $crate::value::json_decode(<Self as $crate::ValueType>::TYPE_NAME, b)
            }
        }
    };
}

/// Declares a prost message as a [`ValueType`] under a type name (StateFun convention:
/// `type.googleapis.com/<full.proto.Name>`).
#[macro_export]
macro_rules! protobuf_type {
    ($ty:ty, $name:literal) => {
        impl $crate::ValueType for $ty {
            const TYPE_NAME: $crate::TypeName = $crate::TypeName::from_static($name);
            fn encode(&self) -> ::std::result::Result<$crate::bytes::Bytes, $crate::CodecError> {
                Ok($crate::value::protobuf_encode(self))
            }
            fn decode(b: &[u8]) -> ::std::result::Result<Self, $crate::CodecError> {
                $crate::value::protobuf_decode(<Self as $crate::ValueType>::TYPE_NAME, b)
            }
        }
    };
}

/// StateFun's built-in primitive types: names and wire encoding.
pub mod builtin {
    use super::*;

    /// `io.statefun.types/bool`
    pub const BOOL: TypeName = TypeName::from_static("io.statefun.types/bool");
    /// `io.statefun.types/int`
    pub const INT: TypeName = TypeName::from_static("io.statefun.types/int");
    /// `io.statefun.types/long`
    pub const LONG: TypeName = TypeName::from_static("io.statefun.types/long");
    /// `io.statefun.types/float`
    pub const FLOAT: TypeName = TypeName::from_static("io.statefun.types/float");
    /// `io.statefun.types/double`
    pub const DOUBLE: TypeName = TypeName::from_static("io.statefun.types/double");
    /// `io.statefun.types/string`
    pub const STRING: TypeName = TypeName::from_static("io.statefun.types/string");

    // The wrapper messages, field 1 each, with StateFun's wire types.
    #[derive(Clone, PartialEq, prost::Message)]
    struct BooleanWrapper {
        #[prost(bool, tag = "1")]
        value: bool,
    }
    #[derive(Clone, PartialEq, prost::Message)]
    struct IntWrapper {
        #[prost(sfixed32, tag = "1")]
        value: i32,
    }
    #[derive(Clone, PartialEq, prost::Message)]
    struct LongWrapper {
        #[prost(sfixed64, tag = "1")]
        value: i64,
    }
    #[derive(Clone, PartialEq, prost::Message)]
    struct FloatWrapper {
        #[prost(float, tag = "1")]
        value: f32,
    }
    #[derive(Clone, PartialEq, prost::Message)]
    struct DoubleWrapper {
        #[prost(double, tag = "1")]
        value: f64,
    }
    #[derive(Clone, PartialEq, prost::Message)]
    struct StringWrapper {
        #[prost(string, tag = "1")]
        value: String,
    }

    macro_rules! primitive {
        ($rust:ty, $name:ident, $wrapper:ident, $to:expr, $from:expr) => {
            impl ValueType for $rust {
                const TYPE_NAME: TypeName = $name;
                fn encode(&self) -> Result<Bytes, CodecError> {
                    #[allow(clippy::redundant_closure_call)]
                    Ok(protobuf_encode(&$wrapper { value: ($to)(self) }))
                }
                fn decode(b: &[u8]) -> Result<Self, CodecError> {
                    let w: $wrapper = protobuf_decode($name, b)?;
                    #[allow(clippy::redundant_closure_call)]
                    Ok(($from)(w.value))
                }
            }
        };
    }
    primitive!(bool, BOOL, BooleanWrapper, |v: &bool| *v, |v| v);
    primitive!(i32, INT, IntWrapper, |v: &i32| *v, |v| v);
    primitive!(i64, LONG, LongWrapper, |v: &i64| *v, |v| v);
    primitive!(u64, LONG, LongWrapper, |v: &u64| *v as i64, |v: i64| v as u64);
    primitive!(f32, FLOAT, FloatWrapper, |v: &f32| *v, |v| v);
    primitive!(f64, DOUBLE, DoubleWrapper, |v: &f64| *v, |v| v);
    primitive!(String, STRING, StringWrapper, |v: &String| v.clone(), |v| v);
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn int_is_a_sfixed32_wrapper_exactly_as_statefun_encodes_it() {
        // field 1, wire type 5 (fixed32) => tag byte 0x0d, then 4 little-endian bytes.
        assert_eq!(&5i32.encode().unwrap()[..], &[0x0d, 5, 0, 0, 0]);
        assert_eq!(&(-1i32).encode().unwrap()[..], &[0x0d, 0xff, 0xff, 0xff, 0xff]);
        // proto3 omits default values: zero is the empty message.
        assert!(0i32.encode().unwrap().is_empty());
    }

    #[test]
    fn long_is_a_sfixed64_wrapper_exactly_as_statefun_encodes_it() {
        assert_eq!(&7i64.encode().unwrap()[..], &[0x09, 7, 0, 0, 0, 0, 0, 0, 0]);
        assert_eq!(&7u64.encode().unwrap()[..], &[0x09, 7, 0, 0, 0, 0, 0, 0, 0]);
    }

    #[test]
    fn bool_string_float_double_use_protobuf_wrappers() {
        assert_eq!(&true.encode().unwrap()[..], &[0x08, 1]);
        assert_eq!(&"hi".to_string().encode().unwrap()[..], &[0x0a, 2, b'h', b'i']);
        assert_eq!(&1.0f32.encode().unwrap()[..], &[0x0d, 0, 0, 0x80, 0x3f]);
        assert_eq!(&1.0f64.encode().unwrap()[..], &[0x09, 0, 0, 0, 0, 0, 0, 0xf0, 0x3f]);
    }

    #[test]
    fn decoding_as_the_wrong_type_is_a_type_mismatch_error() {
        let v = TypedValue::of(&5i32).unwrap();
        assert!(matches!(v.decode::<i64>(), Err(CodecError::TypeMismatch { .. })));
        assert_eq!(v.decode::<i32>().unwrap(), 5);
    }

    #[test]
    fn garbage_bytes_are_a_decode_error_not_a_panic() {
        let v = TypedValue::from_bytes(builtin::STRING, vec![0x0a, 50, b'x']);
        assert!(matches!(v.decode::<String>(), Err(CodecError::Decode { .. })));
    }

    #[test]
    fn absent_value_decodes_to_an_absent_error() {
        let v = TypedValue::absent(builtin::INT);
        assert!(matches!(v.decode::<i32>(), Err(CodecError::Absent(_))));
    }

    #[derive(Clone, PartialEq, prost::Message)]
    struct Order {
        #[prost(string, tag = "1")]
        id: String,
        #[prost(int64, tag = "2")]
        items: i64,
    }
    crate::protobuf_type!(Order, "type.googleapis.com/retail.Order");

    #[test]
    fn protobuf_types_round_trip_under_their_type_name() {
        let o = Order {
            id: "b-1".into(),
            items: 3,
        };
        let v = TypedValue::of(&o).unwrap();
        assert_eq!(v.type_name().namespace(), "type.googleapis.com");
        assert_eq!(v.bytes().unwrap().as_ref(), &[0x0a, 3, b'b', b'-', b'1', 0x10, 3]);
        assert_eq!(v.decode::<Order>().unwrap(), o);
        let garbage = TypedValue::from_bytes(Order::TYPE_NAME, vec![0xff]);
        assert!(matches!(garbage.decode::<Order>(), Err(CodecError::Decode { .. })));
    }

    proptest! {
        #[test]
        fn primitives_round_trip(i in any::<i32>(), l in any::<i64>(), u in any::<u64>(), s in ".*", b in any::<bool>(), d in any::<f64>()) {
            prop_assert_eq!(TypedValue::of(&i).unwrap().decode::<i32>().unwrap(), i);
            prop_assert_eq!(TypedValue::of(&l).unwrap().decode::<i64>().unwrap(), l);
            prop_assert_eq!(TypedValue::of(&u).unwrap().decode::<u64>().unwrap(), u);
            prop_assert_eq!(TypedValue::of(&s).unwrap().decode::<String>().unwrap(), s);
            prop_assert_eq!(TypedValue::of(&b).unwrap().decode::<bool>().unwrap(), b);
            let back = TypedValue::of(&d).unwrap().decode::<f64>().unwrap();
            prop_assert!(back == d || (back.is_nan() && d.is_nan()));
        }
    }
}
