//! Where the model runs: `--device cpu | cuda | cuda:N`, resolved into a candle
//! [`Device`], and what the CUDA driver says about the device's memory.
//!
//! The CPU is the default and needs nothing. `cuda` exists only in builds with the `cuda`
//! feature (scripts/build-cuda.sh); a build without it refuses the flag with a message
//! saying how to get one. Opening a CUDA device that is not there (no driver, no GPU, an
//! ordinal past the last) is an error starting "no CUDA device: ", never a panic.
//!
//! Memory numbers come from the driver (`cuMemGetInfo`, the same call as
//! `torch.cuda.mem_get_info`): free and total bytes of the whole device, so they include
//! other processes. [`open_measured`] estimates them before our context exists and reads
//! them after it and cuBLAS are up: the difference is the runtime overhead the memory
//! budget subtracts and the ledger reports.

use candle_core::Device;

use crate::error::{Error, Result};

/// A device named on the command line.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum DeviceSpec {
    #[default]
    Cpu,
    /// A CUDA device by ordinal (`cuda` is `cuda:0`).
    Cuda(usize),
}

impl DeviceSpec {
    /// Parse `cpu`, `cuda` or `cuda:N`.
    pub fn parse(s: &str) -> Result<Self> {
        let t = s.trim().to_ascii_lowercase();
        match t.as_str() {
            "cpu" => Ok(DeviceSpec::Cpu),
            "cuda" | "gpu" => Ok(DeviceSpec::Cuda(0)),
            _ => match t.strip_prefix("cuda:").map(str::parse::<usize>) {
                Some(Ok(n)) => Ok(DeviceSpec::Cuda(n)),
                _ => Err(Error::InvalidInput(format!(
                    "unknown device {s:?}; accepted: cpu, cuda, cuda:N (N = 0, 1, ...)"
                ))),
            },
        }
    }

    pub fn is_cuda(self) -> bool {
        matches!(self, DeviceSpec::Cuda(_))
    }

    /// `cpu` or `cuda:N`.
    pub fn name(self) -> String {
        match self {
            DeviceSpec::Cpu => "cpu".to_string(),
            DeviceSpec::Cuda(n) => format!("cuda:{n}"),
        }
    }

    /// Open the device (see [`open_measured`] for what the CUDA context costs).
    pub fn open(self) -> Result<Device> {
        Ok(open_measured(self)?.device)
    }
}

/// Whether this build has the CUDA backend.
pub const CUDA_BUILT: bool = cfg!(feature = "cuda");

/// Free and total bytes of a device, as the driver reports them.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DeviceMemory {
    pub free_bytes: u64,
    pub total_bytes: u64,
}

impl DeviceMemory {
    pub fn used_bytes(&self) -> u64 {
        self.total_bytes.saturating_sub(self.free_bytes)
    }
}

/// An opened device and, on CUDA, the driver's memory numbers around its start-up.
#[derive(Debug, Clone)]
pub struct OpenedDevice {
    pub device: Device,
    /// The device's name ("NVIDIA H200"), on CUDA.
    pub name: Option<String>,
    /// Device memory before our context existed (CUDA only): what other processes hold.
    pub before: Option<DeviceMemory>,
    /// Device memory after the context, the stream, cuBLAS and cuRAND were created and
    /// cuBLAS ran once.
    pub after: Option<DeviceMemory>,
}

impl OpenedDevice {
    /// `cpu`, or `cuda:N (NAME)`.
    pub fn device_label(&self) -> String {
        match (&self.device, &self.name) {
            (Device::Cpu, _) => "cpu".to_string(),
            (d, Some(name)) => format!("{} ({name})", device_name(d)),
            (d, None) => device_name(d),
        }
    }

    /// Bytes the CUDA context and libraries took at start-up (after - before used), the
    /// "runtime overhead" of the memory budget. 0 on the CPU.
    pub fn context_bytes(&self) -> u64 {
        match (self.before, self.after) {
            (Some(b), Some(a)) => a.used_bytes().saturating_sub(b.used_bytes()),
            _ => 0,
        }
    }
}

/// Open `spec`, measuring the CUDA context's cost on the way.
pub fn open_measured(spec: DeviceSpec) -> Result<OpenedDevice> {
    match spec {
        DeviceSpec::Cpu => Ok(OpenedDevice {
            device: Device::Cpu,
            name: None,
            before: None,
            after: None,
        }),
        DeviceSpec::Cuda(ordinal) => open_cuda(ordinal),
    }
}

#[cfg(not(feature = "cuda"))]
fn open_cuda(_ordinal: usize) -> Result<OpenedDevice> {
    Err(Error::InvalidInput(
        "this build has no CUDA support; build with scripts/build-cuda.sh".to_string(),
    ))
}

#[cfg(feature = "cuda")]
fn no_device(cause: impl std::fmt::Display) -> Error {
    Error::InvalidInput(format!("no CUDA device: {cause}"))
}

/// Open CUDA device `ordinal` and measure what the runtime costs on it.
///
/// cuMemGetInfo needs a current context, so "before any context of ours" cannot be read
/// directly. The primary context (the one candle uses) is created first and its size is
/// estimated as the cost of a second, throw-away context on the same device; "before"
/// is then the device's use minus that estimate. "After" is read once candle's stream,
/// cuBLAS and cuRAND exist and cuBLAS has run one matmul (its workspace and kernels).
#[cfg(feature = "cuda")]
fn open_cuda(ordinal: usize) -> Result<OpenedDevice> {
    use candle_core::cuda_backend::cudarc::driver::{result, CudaContext};

    result::init().map_err(no_device)?;
    let count = CudaContext::device_count().map_err(no_device)?;
    if count <= 0 || ordinal >= count as usize {
        return Err(no_device(format!(
            "cuda:{ordinal} asked for, the driver sees {count} device(s)"
        )));
    }
    let mem = |ctx: &CudaContext| -> Result<DeviceMemory> {
        let (free, total) = ctx.mem_get_info().map_err(no_device)?;
        Ok(DeviceMemory {
            free_bytes: free as u64,
            total_bytes: total as u64,
        })
    };
    let primary = CudaContext::new(ordinal).map_err(no_device)?;
    let name = primary.name().ok();
    let with_primary = mem(&primary)?;
    // A second context's cost stands in for the primary one's; if the driver refuses
    // one, the context is left out of "before" (and so out of the overhead).
    let context_estimate = CudaContext::new_non_primary(ordinal, 0)
        .ok()
        .and_then(|extra| {
            let m = mem(&extra).ok()?;
            drop(extra);
            Some(m.used_bytes().saturating_sub(with_primary.used_bytes()))
        })
        .unwrap_or(0);
    let before = DeviceMemory {
        free_bytes: (with_primary.free_bytes + context_estimate).min(with_primary.total_bytes),
        total_bytes: with_primary.total_bytes,
    };
    let device = Device::new_cuda(ordinal).map_err(no_device)?;
    // One small matmul makes cuBLAS allocate its workspace and load its kernels.
    let a =
        candle_core::Tensor::ones((64, 64), candle_core::DType::F32, &device).map_err(no_device)?;
    a.matmul(&a)
        .and_then(|b| b.sum_all())
        .and_then(|s| s.to_scalar::<f32>())
        .map_err(no_device)?;
    device.synchronize().map_err(no_device)?;
    let after = mem(&primary)?;
    Ok(OpenedDevice {
        device,
        name,
        before: Some(before),
        after: Some(after),
    })
}

fn device_name(d: &Device) -> String {
    match d.location() {
        candle_core::DeviceLocation::Cuda { gpu_id } => format!("cuda:{gpu_id}"),
        other => format!("{other:?}"),
    }
}

/// The driver's free/total of the CUDA device `device` runs on; `None` on the CPU.
pub fn device_memory(device: &Device) -> Option<DeviceMemory> {
    #[cfg(feature = "cuda")]
    if let Device::Cuda(d) = device {
        let (free, total) = d.cuda_stream().context().mem_get_info().ok()?;
        return Some(DeviceMemory {
            free_bytes: free as u64,
            total_bytes: total as u64,
        });
    }
    let _ = device;
    None
}

/// Bytes in use in the device's default memory pool, which candle allocates from
/// (`cuMemAllocAsync`): now, and the high-water mark since the last
/// [`reset_pool_high_water`]. The difference across a pass is its measured activation
/// peak (everything it allocated and freed again). `reserved_bytes` is what the pool
/// holds from the driver; above `current_bytes` it is the allocator's own (freed blocks
/// it keeps for reuse).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PoolUsage {
    pub current_bytes: u64,
    pub high_water_bytes: u64,
    pub reserved_bytes: u64,
}

/// What a memory ledger reads from a device: the driver's free and total bytes and the
/// allocator pool's. Implemented for candle's [`Device`] (a CUDA device asks the driver;
/// the CPU answers `None`) and by fakes reporting fixed numbers, which test the ledgers'
/// GPU arithmetic on machines without one.
pub trait DeviceProbe: Send + Sync + std::fmt::Debug {
    fn memory(&self) -> Option<DeviceMemory>;
    fn pool(&self) -> Option<PoolUsage>;
}

impl DeviceProbe for Device {
    fn memory(&self) -> Option<DeviceMemory> {
        device_memory(self)
    }

    fn pool(&self) -> Option<PoolUsage> {
        pool_usage(self)
    }
}

/// [`PoolUsage`] of the CUDA device `device` runs on; `None` on the CPU or when the
/// driver does not answer.
pub fn pool_usage(device: &Device) -> Option<PoolUsage> {
    #[cfg(feature = "cuda")]
    if let Device::Cuda(d) = device {
        use candle_core::cuda_backend::cudarc::driver::sys::CUmemPool_attribute as A;
        let pool = cuda_pool::default_pool(d)?;
        return Some(PoolUsage {
            current_bytes: cuda_pool::get(pool, A::CU_MEMPOOL_ATTR_USED_MEM_CURRENT)?,
            high_water_bytes: cuda_pool::get(pool, A::CU_MEMPOOL_ATTR_USED_MEM_HIGH)?,
            reserved_bytes: cuda_pool::get(pool, A::CU_MEMPOOL_ATTR_RESERVED_MEM_CURRENT)?,
        });
    }
    let _ = device;
    None
}

/// Start a new high-water mark of the pool (CUDA only; false when not done).
pub fn reset_pool_high_water(device: &Device) -> bool {
    #[cfg(feature = "cuda")]
    if let Device::Cuda(d) = device {
        return cuda_pool::default_pool(d).is_some_and(cuda_pool::reset_high);
    }
    let _ = device;
    false
}

#[cfg(feature = "cuda")]
mod cuda_pool {
    //! The driver calls behind [`super::pool_usage`], each checked.
    use candle_core::cuda_backend::cudarc::driver::sys;
    use candle_core::cuda_backend::CudaDevice;

    pub(super) fn default_pool(d: &CudaDevice) -> Option<sys::CUmemoryPool> {
        let stream = d.cuda_stream();
        let ctx = stream.context();
        ctx.bind_to_thread().ok()?;
        let mut pool: sys::CUmemoryPool = std::ptr::null_mut();
        // SAFETY: `pool` is a valid out-pointer; the device handle comes from a live
        // context bound to this thread.
        let r = unsafe { sys::cuDeviceGetDefaultMemPool(&mut pool, ctx.cu_device()) };
        (r == sys::CUresult::CUDA_SUCCESS && !pool.is_null()).then_some(pool)
    }

    pub(super) fn get(pool: sys::CUmemoryPool, attr: sys::CUmemPool_attribute) -> Option<u64> {
        let mut value: u64 = 0;
        // SAFETY: the attributes asked for (USED_MEM_CURRENT, USED_MEM_HIGH,
        // RESERVED_MEM_CURRENT) are cuuint64_t, which `value` is.
        let r = unsafe {
            sys::cuMemPoolGetAttribute(pool, attr, &mut value as *mut u64 as *mut std::ffi::c_void)
        };
        (r == sys::CUresult::CUDA_SUCCESS).then_some(value)
    }

    pub(super) fn reset_high(pool: sys::CUmemoryPool) -> bool {
        let mut zero: u64 = 0;
        // SAFETY: USED_MEM_HIGH takes a cuuint64_t, and only zero.
        let r = unsafe {
            sys::cuMemPoolSetAttribute(
                pool,
                sys::CUmemPool_attribute::CU_MEMPOOL_ATTR_USED_MEM_HIGH,
                &mut zero as *mut u64 as *mut std::ffi::c_void,
            )
        };
        r == sys::CUresult::CUDA_SUCCESS
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn device_names_parse() {
        assert_eq!(DeviceSpec::parse("cpu").unwrap(), DeviceSpec::Cpu);
        assert_eq!(DeviceSpec::parse("CUDA").unwrap(), DeviceSpec::Cuda(0));
        assert_eq!(DeviceSpec::parse("cuda:3").unwrap(), DeviceSpec::Cuda(3));
        for bad in ["cuda:", "cuda:x", "tpu", "cuda:-1"] {
            let e = DeviceSpec::parse(bad).unwrap_err().to_string();
            assert!(e.contains("cpu, cuda, cuda:N"), "{bad}: {e}");
        }
    }

    #[test]
    fn cpu_opens_and_has_no_context_cost() {
        let d = open_measured(DeviceSpec::Cpu).unwrap();
        assert!(d.device.is_cpu());
        assert_eq!(d.context_bytes(), 0);
        assert_eq!(device_memory(&d.device), None);
        assert_eq!(pool_usage(&d.device), None);
        assert!(!reset_pool_high_water(&d.device));
    }

    #[cfg(not(feature = "cuda"))]
    #[test]
    fn cuda_without_the_feature_says_how_to_build_it() {
        let e = DeviceSpec::Cuda(0).open().unwrap_err().to_string();
        assert_eq!(
            e,
            "this build has no CUDA support; build with scripts/build-cuda.sh"
        );
    }
}
