//! A mappable BPF array's values, mapped into this process (`BPF_F_MMAPABLE`): the ring map
//! (tables written with one memory copy) and the connection tables (read and written in place).

use std::marker::PhantomData;

/// `len` values of type `T`, shared with the kernel. The program may write them at any time:
/// read them with `get` (a volatile copy), never through a reference held across its writes.
pub struct MapMemory<T> {
    ptr: *mut T,
    len: usize,
    _values: PhantomData<T>,
}

// SAFETY: the mapping is plain shared memory owned by this value; writes go through &mut self.
unsafe impl<T: Send> Send for MapMemory<T> {}

impl<T: Copy> MapMemory<T> {
    /// Maps the first `len` values of the array map `fd` (whose values are `T`, laid out back
    /// to back: the map's value size must be `size_of::<T>()`, a multiple of 8).
    pub fn map(fd: i32, len: usize) -> std::io::Result<Self> {
        let bytes = len * size_of::<T>();
        // SAFETY: maps `bytes` of the map's memory, which the kernel sized for at least `len`
        // values rounded up to a page; the mapping is unmapped in Drop.
        let ptr = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                bytes,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_SHARED,
                fd,
                0,
            )
        };
        if ptr == libc::MAP_FAILED {
            return Err(std::io::Error::last_os_error());
        }
        Ok(MapMemory {
            ptr: ptr.cast(),
            len,
            _values: PhantomData,
        })
    }

    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// A copy of value `i`, read while the program may be writing it.
    pub fn get(&self, i: usize) -> T {
        assert!(i < self.len, "value {i} of {}", self.len);
        // SAFETY: in bounds of a live mapping (page aligned, so every value is aligned); a
        // volatile read, since the kernel writes this memory behind the compiler's back.
        unsafe { self.ptr.add(i).read_volatile() }
    }

    /// Writes value `i`.
    pub fn set(&mut self, i: usize, value: T) {
        assert!(i < self.len, "value {i} of {}", self.len);
        // SAFETY: as in `get`.
        unsafe { self.ptr.add(i).write_volatile(value) }
    }

    /// The values, for bulk writes of values the program does not write (ring tables not yet
    /// live).
    pub fn as_mut_slice(&mut self) -> &mut [T] {
        // SAFETY: ptr/len describe a live, writable mapping of `T`s.
        unsafe { std::slice::from_raw_parts_mut(self.ptr, self.len) }
    }
}

impl<T> Drop for MapMemory<T> {
    fn drop(&mut self) {
        // SAFETY: unmaps exactly the mapping made in `map`.
        unsafe { libc::munmap(self.ptr.cast(), self.len * size_of::<T>()) };
    }
}
