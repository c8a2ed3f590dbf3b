//! Kernel struct offsets read from BTF at run time: aya-ebpf emits no CO-RE relocations, so
//! the programs get these as globals instead.
use anyhow::{Context as _, Result, anyhow};
use btf_rs::{Btf, Type};

const VMLINUX: &str = "/sys/kernel/btf/vmlinux";

pub struct KernelTypes {
    btf: Btf,
}

impl KernelTypes {
    pub fn load() -> Result<Self> {
        Ok(Self { btf: Btf::from_file(VMLINUX).with_context(|| format!("reading {VMLINUX}"))? })
    }

    /// Byte offset of `path` ("a.b.c": members, through anonymous structs and unions) in
    /// struct `name`.
    pub fn offset(&self, name: &str, path: &str) -> Result<u64> {
        let mut ty = self.struct_named(name)?;
        let mut total = 0u64;
        for field in path.split('.') {
            let (offset, member_ty) = self
                .find_member(&ty, field)?
                .ok_or_else(|| anyhow!("struct {name} has no member {path}"))?;
            total += offset;
            ty = member_ty;
        }
        Ok(total)
    }

    fn struct_named(&self, name: &str) -> Result<Type> {
        self.btf
            .resolve_types_by_name(name)
            .with_context(|| format!("BTF has no type {name}"))?
            .into_iter()
            .find(|t| matches!(t, Type::Struct(_)))
            .ok_or_else(|| anyhow!("BTF type {name} is not a struct"))
    }

    /// (byte offset, type) of member `field` of struct/union `ty`, searching anonymous members.
    fn find_member(&self, ty: &Type, field: &str) -> Result<Option<(u64, Type)>> {
        let members = match ty {
            Type::Struct(s) | Type::Union(s) => &s.members,
            _ => return Ok(None),
        };
        for m in members {
            let name = self.btf.resolve_name(m).unwrap_or_default();
            let member_ty = self.strip_typedefs(self.btf.resolve_chained_type(m)?)?;
            let offset = u64::from(m.bit_offset() / 8);
            if name == field {
                return Ok(Some((offset, member_ty)));
            }
            if name.is_empty()
                && let Some((inner, t)) = self.find_member(&member_ty, field)?
            {
                return Ok(Some((offset + inner, t)));
            }
        }
        Ok(None)
    }

    fn strip_typedefs(&self, mut ty: Type) -> Result<Type> {
        while let Type::Typedef(_) | Type::Volatile(_) | Type::Const(_) = ty {
            let inner = match &ty {
                Type::Typedef(t) => self.btf.resolve_chained_type(t)?,
                Type::Volatile(t) => self.btf.resolve_chained_type(t)?,
                Type::Const(t) => self.btf.resolve_chained_type(t)?,
                _ => unreachable!(),
            };
            ty = inner;
        }
        Ok(ty)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finds_fields_inside_anonymous_unions() {
        let k = KernelTypes::load().unwrap();
        // skc_num sits in an anonymous struct inside an anonymous union of sock_common.
        let num = k.offset("sock", "__sk_common.skc_num").unwrap();
        let dport = k.offset("sock", "__sk_common.skc_dport").unwrap();
        assert_eq!(num, dport + 2, "skc_dport and skc_num share the port pair");
        assert!(k.offset("sock", "sk_max_ack_backlog").unwrap() > k.offset("sock", "__sk_common").unwrap());
        assert!(k.offset("sock", "no_such_field").is_err());
    }
}
