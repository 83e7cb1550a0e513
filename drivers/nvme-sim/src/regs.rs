//! The controller's register file (base spec 3.1.4): CAP and VS are fixed, CC, AQA, ASQ,
//! ACQ and the interrupt masks are stored as written, CSTS reflects the controller's
//! state. What writing CC does (enable, reset, shutdown) is in the engine.

use nvcopy_nvme::spec::{csts, reg};

/// Version the controller reports: NVMe 2.0.0.
pub const VERSION: u32 = 0x0002_0000;
/// Interrupt Mask Clear.
const INTMC: usize = 0x10;

/// Register state.
#[derive(Debug, Default)]
pub struct Regs {
    pub cc: u32,
    pub aqa: u32,
    pub asq: u64,
    pub acq: u64,
    pub intms: u32,
    /// CSTS.RDY.
    pub rdy: bool,
    /// CSTS.SHST.
    pub shst: u32,
    /// Fatal status the controller raised itself (unreachable queue memory, a bad admin
    /// queue setup). Cleared by a reset, unlike an injected one.
    pub cfs: bool,
}

impl Regs {
    /// Memory page size programmed in CC.MPS.
    pub fn page_size(&self) -> usize {
        4096 << (self.cc >> 7 & 0xf)
    }

    /// A 32-bit register load. Reserved and unimplemented registers read as zero.
    pub fn read(&self, cap: u64, injected_fatal: bool, offset: usize) -> u32 {
        match offset {
            reg::CAP => cap as u32,
            o if o == reg::CAP + 4 => (cap >> 32) as u32,
            reg::VS => VERSION,
            reg::INTMS | INTMC => self.intms,
            reg::CC => self.cc,
            reg::CSTS => {
                let cfs = if self.cfs || injected_fatal {
                    csts::CFS
                } else {
                    0
                };
                self.rdy as u32 | cfs | self.shst
            }
            reg::AQA => self.aqa,
            reg::ASQ => self.asq as u32,
            o if o == reg::ASQ + 4 => (self.asq >> 32) as u32,
            reg::ACQ => self.acq as u32,
            o if o == reg::ACQ + 4 => (self.acq >> 32) as u32,
            _ => 0,
        }
    }

    /// A 32-bit store to anything but CC and the doorbells. Returns false for a register
    /// that cannot be written (the store is ignored).
    pub fn write(&mut self, offset: usize, value: u32) -> bool {
        let low = |r: u64| (r & !0xffff_ffff) | value as u64;
        let high = |r: u64| (r & 0xffff_ffff) | (value as u64) << 32;
        match offset {
            reg::INTMS => self.intms |= value,
            INTMC => self.intms &= !value,
            reg::AQA => self.aqa = value & 0x0fff_0fff,
            reg::ASQ => self.asq = low(self.asq) & !0xfff,
            o if o == reg::ASQ + 4 => self.asq = high(self.asq),
            reg::ACQ => self.acq = low(self.acq) & !0xfff,
            o if o == reg::ACQ + 4 => self.acq = high(self.acq),
            _ => return false,
        }
        true
    }
}
