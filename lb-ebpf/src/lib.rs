// This file exists to enable the library target, which lets lb-userspace name this crate as a
// build-dependency so cargo rebuilds the object when its sources change.
#![no_std]
