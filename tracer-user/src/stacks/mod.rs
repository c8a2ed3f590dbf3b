//! User and kernel stacks of a stall: DWARF unwinding of the user stack snapshot the kernel
//! copies (the targets are built without frame pointers) and symbolization of the frames.
pub mod allocator;
pub mod collect;
pub mod parked;
pub mod perfmap;
pub mod symbolize;
pub mod unwind;
