//! The pin directory: where the maps and the XDP link live on a bpf filesystem, so the data plane
//! keeps forwarding while no daemon runs and a restarted or upgraded daemon adopts it.
//!
//! Layout: `DIR/maps/<MAP NAME>` for every map, `DIR/link` for the XDP link of the first
//! interface and `DIR/link-<IFACE>` for that of each further one (`--iface A --iface B`).
//!
//! Upgrades: a pinned map is reused only if its layout (type, key and value size, flags) is the
//! one this build expects. Counter maps whose layout changed are recreated (their counts start
//! again from zero); a changed state map (services, backends, rings, connection table) refuses
//! the start with an explanation, because reusing it would misread every entry. The connection
//! tables of older builds (the LRU hash maps `CONNTRACK`, `CONNTRACK_V6`; the sets of whole
//! 5-tuples `FLOW_TABLE`, `FLOW_TABLE_V6`) are read once, their flows copied into this build's
//! tables (`Dataplane::carry_legacy_flows`), and unpinned.

use std::path::{Path, PathBuf};

use aya::maps::MapInfo;
use lb_common::{
    Backend, DataplaneConfig, FLOW_WAYS, FlowKeyV4, FlowKeyV6, FlowSetV4, FlowSetV6, FlowState,
    LcList, NatReplyV4, NatReplyV6, RING_CHUNKS, RingChunk, Service, ServiceKeyV4, ServiceKeyV6,
    Traffic, names,
};
use tracing::warn;

use crate::{dataplane::Sizing, flow_table::legacy};

/// `BPF_F_MMAPABLE`, which the ring map needs for userspace to write tables by memory copy.
const BPF_F_MMAPABLE: u32 = 1 << 10;
/// `statfs` magic of a bpf filesystem.
const BPF_FS_MAGIC: i64 = 0xcafe_4a11;

#[derive(Debug, thiserror::Error)]
pub enum PinError {
    #[error(
        "{0} is not on a bpf filesystem (mount one: mount -t bpf bpf {0}; inside `ip netns exec` \
         use a bpffs mounted outside /sys, e.g. /run/lb/bpffs)"
    )]
    NotBpffs(PathBuf),
    #[error(
        "pinned map {name} at {path} has {found}, but this version needs {wanted}: the data \
         plane was left by an incompatible version. Stop it with `lb daemon --fresh` (drops \
         established connections) or run the version that created it"
    )]
    Incompatible {
        name: &'static str,
        path: PathBuf,
        found: String,
        wanted: String,
    },
    #[error("{what} {path}: {source}")]
    Io {
        what: &'static str,
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("reading pinned map {name}: {source}")]
    Info {
        name: &'static str,
        source: aya::maps::MapError,
    },
}

/// Whether a map holds forwarding state (must be reused or refused) or only counters.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Role {
    State,
    /// State that a data plane pinned by an older build does not have yet: created empty
    /// then (the modes using it did not exist), checked like `State` when present.
    NewState,
    /// Counters, or settings the daemon writes again at every start.
    Counters,
    /// A map of older builds whose entries are carried into this build's maps: kept when its
    /// layout is the one expected, removed otherwise.
    Legacy,
}

struct Layout {
    name: &'static str,
    key_size: usize,
    value_size: usize,
    flags: u32,
    role: Role,
}

const LAYOUTS: [Layout; 23] = [
    layout::<ServiceKeyV4, Service>(names::SERVICES, 0, Role::State),
    layout::<u32, Backend>(names::BACKENDS, 0, Role::State),
    layout::<u32, RingChunk>(names::RINGS, BPF_F_MMAPABLE, Role::State),
    layout::<u32, FlowSetV4>(names::FLOWS, BPF_F_MMAPABLE, Role::NewState),
    layout::<u32, FlowSetV6>(names::FLOWS_V6, BPF_F_MMAPABLE, Role::NewState),
    layout::<FlowKeyV4, FlowState>(names::LEGACY_CONNTRACK, 0, Role::Legacy),
    layout::<FlowKeyV6, FlowState>(names::LEGACY_CONNTRACK_V6, 0, Role::Legacy),
    layout::<u32, legacy::SetV4>(names::LEGACY_FLOW_TABLE, BPF_F_MMAPABLE, Role::Legacy),
    layout::<u32, legacy::SetV6>(names::LEGACY_FLOW_TABLE_V6, BPF_F_MMAPABLE, Role::Legacy),
    layout::<u32, Traffic>(names::SERVICE_STATS, 0, Role::Counters),
    layout::<u32, Traffic>(names::BACKEND_STATS, 0, Role::Counters),
    layout::<u32, u64>(names::REASON_STATS, 0, Role::Counters),
    layout::<u32, i64>(names::FLOW_COUNTS, 0, Role::State),
    layout::<u32, u32>(names::RR_CURSORS, 0, Role::Counters),
    layout::<u32, LcList>(names::LC_LISTS, 0, Role::State),
    layout::<u32, u32>(names::CLOCK, 0, Role::Counters),
    layout::<ServiceKeyV6, Service>(names::SERVICES_V6, 0, Role::State),
    layout::<u32, DataplaneConfig>(names::CONFIG, 0, Role::Counters),
    layout::<FlowKeyV4, FlowState>(names::NAT_FLOWS, 0, Role::NewState),
    layout::<FlowKeyV6, FlowState>(names::NAT_FLOWS_V6, 0, Role::NewState),
    layout::<FlowKeyV4, NatReplyV4>(names::NAT_REPLIES, 0, Role::NewState),
    layout::<FlowKeyV6, NatReplyV6>(names::NAT_REPLIES_V6, 0, Role::NewState),
    // `struct bpf_devmap_val`: the ifindex and a program fd/id.
    layout::<u32, [u32; 2]>(names::TX_PORTS, 0, Role::Counters),
];

const fn layout<K, V>(name: &'static str, flags: u32, role: Role) -> Layout {
    Layout {
        name,
        key_size: size_of::<K>(),
        value_size: size_of::<V>(),
        flags,
        role,
    }
}

pub struct PinDir {
    root: PathBuf,
}

impl PinDir {
    /// Checks `root` is on a bpf filesystem and creates `root/maps`. Under /sys/fs/bpf, mounts
    /// the bpf filesystem there first if nothing is mounted (as systemd would).
    pub fn open(root: &Path) -> Result<Self, PinError> {
        let io = |what, source| PinError::Io {
            what,
            path: root.to_owned(),
            source,
        };
        let default_mount = Path::new("/sys/fs/bpf");
        if root.starts_with(default_mount) && default_mount.is_dir() && !is_bpffs(default_mount) {
            mount_bpffs(default_mount).map_err(|e| io("mounting a bpf filesystem on", e))?;
            warn!(
                "mounted a bpf filesystem on /sys/fs/bpf; if this runs under `ip netns exec` it \
                 vanishes with the daemon, so restarts cannot adopt the data plane (use --pin-dir \
                 on a bpffs outside /sys)"
            );
        }
        let nearest = root
            .ancestors()
            .find(|p| p.exists())
            .unwrap_or(Path::new("/"));
        if !is_bpffs(nearest) {
            return Err(PinError::NotBpffs(root.to_owned()));
        }
        std::fs::create_dir_all(root.join("maps")).map_err(|e| io("creating", e))?;
        Ok(PinDir {
            root: root.to_owned(),
        })
    }

    pub fn map_path(&self, name: &str) -> PathBuf {
        self.root.join("maps").join(name)
    }

    pub fn link_path(&self) -> PathBuf {
        self.root.join("link")
    }

    /// The link of a further interface (after the first).
    pub fn extra_link_path(&self, iface: &str) -> PathBuf {
        self.root.join(format!("link-{iface}"))
    }

    /// The further interfaces' links pinned here, by interface name.
    pub fn extra_links(&self) -> Vec<(String, PathBuf)> {
        let Ok(dir) = std::fs::read_dir(&self.root) else {
            return Vec::new();
        };
        dir.filter_map(|e| {
            let e = e.ok()?;
            let name = e.file_name().to_str()?.strip_prefix("link-")?.to_owned();
            Some((name, e.path()))
        })
        .collect()
    }

    /// True when a data plane was left here (a pinned link or pinned maps).
    pub fn has_state(&self) -> bool {
        self.link_path().exists() || self.map_path(names::SERVICES).exists()
    }

    /// Checks every pinned map against this build's layouts. Returns the sizing of the pinned
    /// maps, or `None` when nothing is pinned. Counter maps of another layout are removed so
    /// the load creates them anew.
    pub fn check_layouts(&self) -> Result<Option<Sizing>, PinError> {
        if !self.map_path(names::SERVICES).exists() {
            return Ok(None);
        }
        let mut sizing = Sizing::default();
        // A data plane from before the NAT maps: they are created with the default size.
        for l in &LAYOUTS {
            let path = self.map_path(l.name);
            let Ok(info) = MapInfo::from_pin(&path) else {
                if l.role == Role::State {
                    return Err(PinError::Incompatible {
                        name: l.name,
                        path,
                        found: "nothing".into(),
                        wanted: "one pinned with the others".into(),
                    });
                }
                continue;
            };
            let found = (
                info.key_size() as usize,
                info.value_size() as usize,
                info.map_flags() & BPF_F_MMAPABLE,
            );
            let changed = found != (l.key_size, l.value_size, l.flags);
            if changed && matches!(l.role, Role::State | Role::NewState) {
                let describe = |(k, v, f): (usize, usize, u32)| {
                    format!("key size {k}, value size {v}, mmapable {}", f != 0)
                };
                return Err(PinError::Incompatible {
                    name: l.name,
                    path,
                    found: describe(found),
                    wanted: describe((l.key_size, l.value_size, l.flags)),
                });
            }
            // Removed so the load makes it again: a counter map of another layout or a reason
            // array from a build with fewer reasons (its counts restart), or an older
            // connection table this build cannot read.
            let stale = if l.role == Role::Legacy {
                changed.then_some(
                    "an older connection table of an unknown layout: its flows are not carried \
                     over (their next packets are placed again)",
                )
            } else {
                (changed
                    || (l.name == names::REASON_STATS
                        && info.max_entries() < lb_common::Reason::COUNT))
                    .then_some("counter map layout changed; its counts restart at zero")
            };
            if let Some(why) = stale {
                warn!(map = l.name, "{why}");
                std::fs::remove_file(&path).map_err(|source| PinError::Io {
                    what: "removing",
                    path: path.clone(),
                    source,
                })?;
                continue;
            }
            match l.name {
                // The ring map holds one table per service plus a spare. (SERVICES is no
                // measure: this version gives it room for each service's port-0 key too.)
                names::RINGS => {
                    let entries = info.max_entries();
                    if entries % RING_CHUNKS != 0 || entries < 2 * RING_CHUNKS {
                        return Err(PinError::Incompatible {
                            name: l.name,
                            path,
                            found: format!("{entries} entries"),
                            wanted: format!("a multiple of {RING_CHUNKS}, at least two tables"),
                        });
                    }
                    sizing.max_services = entries / RING_CHUNKS - 1;
                }
                names::BACKENDS => sizing.max_backends = info.max_entries(),
                // An older build's table sizes the new one, unless the new one is pinned.
                names::FLOWS => {
                    sizing.conntrack_size = info.max_entries().saturating_mul(FLOW_WAYS as u32);
                }
                names::LEGACY_FLOW_TABLE if !self.map_path(names::FLOWS).exists() => {
                    sizing.conntrack_size = info.max_entries().saturating_mul(FLOW_WAYS as u32);
                }
                names::LEGACY_CONNTRACK
                    if !self.map_path(names::FLOWS).exists()
                        && !self.map_path(names::LEGACY_FLOW_TABLE).exists() =>
                {
                    sizing.conntrack_size = info.max_entries();
                }
                names::NAT_FLOWS => sizing.nat_size = info.max_entries(),
                _ => {}
            }
        }
        Ok(Some(sizing))
    }

    /// Removes everything pinned here: the link (which detaches the program once no process
    /// holds it) and the maps.
    pub fn remove_all(&self) -> Result<(), PinError> {
        let rm = |path: PathBuf| match std::fs::remove_file(&path) {
            Ok(()) => Ok(()),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
            Err(source) => Err(PinError::Io {
                what: "removing",
                path,
                source,
            }),
        };
        rm(self.link_path())?;
        for (_, path) in self.extra_links() {
            rm(path)?;
        }
        for l in &LAYOUTS {
            rm(self.map_path(l.name))?;
        }
        let _ = std::fs::remove_dir(self.root.join("maps"));
        let _ = std::fs::remove_dir(&self.root);
        Ok(())
    }

    /// The map names this build pins, for the loader.
    pub fn map_names() -> impl Iterator<Item = &'static str> {
        LAYOUTS
            .iter()
            .filter(|l| l.role != Role::Legacy)
            .map(|l| l.name)
    }
}

fn mount_bpffs(at: &Path) -> std::io::Result<()> {
    use std::os::unix::ffi::OsStrExt as _;
    let target =
        std::ffi::CString::new(at.as_os_str().as_bytes()).map_err(std::io::Error::other)?;
    // SAFETY: all arguments are valid NUL-terminated strings; no data argument.
    let rc = unsafe {
        libc::mount(
            c"bpf".as_ptr(),
            target.as_ptr(),
            c"bpf".as_ptr(),
            0,
            std::ptr::null(),
        )
    };
    if rc == 0 {
        Ok(())
    } else {
        Err(std::io::Error::last_os_error())
    }
}

fn is_bpffs(path: &Path) -> bool {
    use std::os::unix::ffi::OsStrExt as _;
    let Ok(c) = std::ffi::CString::new(path.as_os_str().as_bytes()) else {
        return false;
    };
    let mut st: libc::statfs = unsafe { std::mem::zeroed() };
    // SAFETY: c is a valid C string and st a writable statfs.
    let ok = unsafe { libc::statfs(c.as_ptr(), &mut st) } == 0;
    ok && st.f_type == BPF_FS_MAGIC
}
