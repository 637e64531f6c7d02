//! AML that is already encoded, so objects built in loops (one device per CPU, slot, ...) can be
//! nested where the `acpi_tables` builders want an [`Aml`] object borrowed for their lifetime.

use acpi_tables::aml::{Method, Path};
use acpi_tables::{Aml, AmlSink};

/// Encoded AML bytes that re-emit themselves unchanged.
pub(super) struct Serialized(pub(super) Vec<u8>);

impl Aml for Serialized {
    fn to_aml_bytes(&self, sink: &mut dyn AmlSink) {
        sink.vec(&self.0);
    }
}

/// The AML encoding of `object`.
pub(super) fn encode(object: &dyn Aml) -> Vec<u8> {
    let mut aml = Vec::new();
    object.to_aml_bytes(&mut aml);
    aml
}

/// The AML encodings of `objects`, one after the other.
pub(super) fn encode_all(objects: &[&dyn Aml]) -> Vec<u8> {
    objects.iter().flat_map(|o| encode(*o)).collect()
}

/// `Method (path, args, NotSerialized) { body }`, encoded.
pub(super) fn method(path: Path, args: u8, body: &[&dyn Aml]) -> Vec<u8> {
    encode(&Method::new(path, args, false, body.to_vec()))
}

/// `Method (path, args, Serialized) { body }`, encoded: for methods that create named objects,
/// which a second concurrent call would otherwise find already existing.
pub(super) fn serialized_method(path: Path, args: u8, body: &[&dyn Aml]) -> Vec<u8> {
    encode(&Method::new(path, args, true, body.to_vec()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use acpi_tables::aml::{Name, Return, ONE};

    #[test]
    fn serialized_bytes_are_emitted_unchanged() {
        let name = encode(&Name::new("ABCD".into(), &ONE));
        assert_eq!(name, b"\x08ABCD\x01");
        assert_eq!(encode(&Serialized(name.clone())), name);
        assert_eq!(
            encode_all(&[&Serialized(name.clone()), &ONE]),
            b"\x08ABCD\x01\x01"
        );
    }

    #[test]
    fn method_flags() {
        // MethodOp PkgLength "TEST" flags (args | serialized << 3) ReturnOp One.
        let body = Return::new(&ONE);
        assert_eq!(
            method("TEST".into(), 2, &[&body]),
            b"\x14\x08TEST\x02\xa4\x01"
        );
        assert_eq!(
            serialized_method("TEST".into(), 1, &[&body]),
            b"\x14\x08TEST\x09\xa4\x01"
        );
    }
}
