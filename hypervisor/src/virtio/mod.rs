//! Virtio devices on the lguest bus: pure, host-tested device models.
//!
//! Nothing here touches hardware or tasks: every function takes the guest's
//! memory as a [`GuestMemory`] and
//! returns decisions (raise this irq, kill the guest with this text). The
//! kernel glues them to host tasks.
//!
//! - [`queue`]: legacy split virtqueues at `pfn << 12` with 4096-byte used
//!   ring alignment; validated, bounded chain walks (one fetch per
//!   descriptor); used ring; interrupt and notify suppression.
//! - [`devpage`]: the lguest bus device page above guest RAM (layout of
//!   records and rings, `NOTIFY` decoding, status changes, resets).
//! - [`console`], [`rng`], [`block`], [`net`]: one device model each,
//!   implementing [`VirtioDevice`]; [`switch`]: a learning L2 switch that
//!   moves frames between [`net::Net`] devices of different guests.
//!
//! # Gluing a device to a guest
//!
//! ```text
//! launcher, before INITIALIZE:
//!   devices: console, rng, [block], [net]            (each a VirtioDevice)
//!   page = DevicePage::new(ram_pages)
//!   for d in devices: page.add(&d)?                  (rings and irqs 1, 2, … assigned)
//!   page.write(mem)?                                  (device page + zeroed rings)
//!   INITIALIZE(base, pfnlimit = page.end_pfn(), start)
//! read() returned NOTIFY(addr):
//!   match page.decode_notify(addr):
//!     Status(k)     => match page.status_changed(mem, k)?:
//!                        Reset | Failed  => page.reset(mem, k)?; devices[k].reset()
//!                        Start           => devices[k].activate(page.queues(k, mem.limit())?,
//!                                                               page.guest_features(mem, k)?)?
//!                        Progress(_)     => {}
//!     Kick(k, q)    => if page.kick_starts(k) { activate as above }
//!                      service devices[k] (the device's own method, e.g. Console::service)
//!                      for q in devices[k].queues_mut(): if q.take_interrupt(mem)? { IRQ q.irq() }
//!     Other(addr)   => early console string (addr < mem.limit()) or "no device there"
//! any Err(e) above  => kill the guest with e.to_string()
//! ```
//!
//! `EVENTFD` can bind each ring's kick address (`pfn << 12`,
//! [`devpage::DevicePage::queue_config`]) to a service task; that task loops
//! "service, `take_interrupt` → IRQ, `enable_notify` → sleep or continue,
//! `disable_notify`" (see [`queue::VirtQueue::enable_notify`]).
//!
//! The modules deny `clippy::indexing_slicing` and
//! `clippy::arithmetic_side_effects` outside their tests.

use crate::lguest::guestmem::GuestMemory;
use alloc::vec::Vec;

extern crate alloc;

pub mod block;
pub mod bus;
pub mod console;
pub mod devpage;
pub mod net;
pub mod queue;
pub mod rng;
pub mod switch;
#[cfg(test)]
pub(crate) mod testdriver;

pub use devpage::{DevicePage, Notify, StatusEvent};
pub use queue::{Chain, QueueError, VirtQueue};

/// A fatal device error: the guest misused the device. The integrator kills
/// the guest with the `Display` text.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum DeviceError {
    /// A ring or chain was invalid.
    Queue(QueueError),
    /// A request was malformed for this device (the text says how).
    BadRequest(&'static str),
    /// A status byte change the bus does not accept.
    BadStatus {
        /// Device index on the bus.
        device: usize,
        /// The status byte the guest wrote.
        status: u8,
        /// What is wrong with it.
        why: &'static str,
    },
    /// Activation was given the wrong number of queues.
    QueueCount {
        /// Queues the device has.
        want: usize,
        /// Queues given.
        got: usize,
    },
    /// The device index does not exist on the bus.
    NoSuchDevice(usize),
}

impl From<QueueError> for DeviceError {
    fn from(e: QueueError) -> Self {
        Self::Queue(e)
    }
}

impl From<crate::lguest::guestmem::MemFault> for DeviceError {
    fn from(e: crate::lguest::guestmem::MemFault) -> Self {
        Self::Queue(QueueError::Mem(e))
    }
}

impl core::fmt::Display for DeviceError {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        match self {
            Self::Queue(e) => e.fmt(f),
            Self::BadRequest(why) => write!(f, "bad device request: {why}"),
            Self::BadStatus {
                device,
                status,
                why,
            } => write!(f, "device {device}: bad status {status:#x}: {why}"),
            Self::QueueCount { want, got } => {
                write!(f, "device has {want} queues, {got} configured")
            }
            Self::NoSuchDevice(k) => write!(f, "no device {k}"),
        }
    }
}

/// What every device model offers the bus and the launcher.
pub trait VirtioDevice {
    /// Virtio device id (`guest_abi::device::VIRTIO_ID_*`).
    fn device_type(&self) -> u8;
    /// Ring sizes, one per queue (each a power of two).
    fn queue_sizes(&self) -> &[u16];
    /// Feature bits offered (the first 32; the lguest bus carries no more).
    /// None by default.
    fn host_features(&self) -> u32 {
        0
    }
    /// The device config bytes the guest reads from the device page. None
    /// by default.
    fn config(&self) -> Vec<u8> {
        Vec::new()
    }
    /// Start the device with its queues (from
    /// [`DevicePage::queues`]) and the features the guest accepted.
    fn activate(&mut self, queues: Vec<VirtQueue>, guest_features: u32) -> Result<(), DeviceError>;
    /// Stop the device and drop its queues (status 0 or FAILED).
    fn reset(&mut self);
    /// The active queues (empty before [`Self::activate`]), e.g. for
    /// [`VirtQueue::take_interrupt`] after servicing.
    fn queues_mut(&mut self) -> &mut [VirtQueue];
}

/// After servicing a device: the irqs to raise, one per queue whose
/// [`VirtQueue::take_interrupt`] said so (at most one per queue).
pub fn interrupts<M: GuestMemory + ?Sized>(
    dev: &mut dyn VirtioDevice,
    mem: &M,
) -> Result<Vec<u16>, DeviceError> {
    let mut irqs = Vec::new();
    for q in dev.queues_mut() {
        if q.take_interrupt(mem)? {
            irqs.push(q.irq());
        }
    }
    Ok(irqs)
}

/// Check `queues.len() == want` for [`VirtioDevice::activate`].
pub(crate) fn expect_queues(queues: &[VirtQueue], want: usize) -> Result<(), DeviceError> {
    if queues.len() == want {
        Ok(())
    } else {
        Err(DeviceError::QueueCount {
            want,
            got: queues.len(),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::console::{Console, TX};
    use super::testdriver::{Driver, RAM_PAGES};
    use super::*;
    use crate::lguest::guestmem::VecMemory;
    use alloc::string::ToString;

    /// The launcher glue from the module docs, driven by a guest: status
    /// notifications, a kick, the interrupt, a hostile kick, a reset.
    #[test]
    fn launcher_glue() {
        let mut con = Console::default();
        let mut page = DevicePage::new(RAM_PAGES).unwrap();
        let k = page.add(&con).unwrap();
        let mut mem = VecMemory::new(page.end_pfn() * 4096);
        page.write(&mut mem).unwrap();
        let status = page.device_addr(k).unwrap();
        let mut out = Vec::new();
        let mut irqs = Vec::new();
        // What the launcher does with NOTIFY(addr).
        let notify = |addr: u32,
                      mem: &mut VecMemory,
                      page: &mut DevicePage,
                      con: &mut Console,
                      out: &mut Vec<u8>,
                      irqs: &mut Vec<u16>|
         -> Result<(), DeviceError> {
            match page.decode_notify(addr) {
                Notify::Status(k) => match page.status_changed(mem, k)? {
                    StatusEvent::Reset | StatusEvent::Failed => {
                        page.reset(mem, k)?;
                        con.reset();
                    }
                    StatusEvent::Start => {
                        con.activate(page.queues(k, mem.limit())?, page.guest_features(mem, k)?)?
                    }
                    StatusEvent::Progress(_) => {}
                },
                Notify::Kick { device, .. } => {
                    if page.kick_starts(device) {
                        con.activate(
                            page.queues(device, mem.limit())?,
                            page.guest_features(mem, device)?,
                        )?;
                    }
                    con.service_tx(mem, |b| out.extend_from_slice(b))?;
                    con.service_rx(mem)?;
                    irqs.extend(interrupts(con, mem)?);
                }
                Notify::Other(a) => out.extend_from_slice(format!("[early {a:#x}]").as_bytes()),
            }
            Ok(())
        };
        // The guest: ACK, DRIVER, DRIVER_OK, each followed by a notify.
        for s in [1u8, 3, 7] {
            mem.write_u8(status + 4, s).unwrap();
            notify(status, &mut mem, &mut page, &mut con, &mut out, &mut irqs).unwrap();
        }
        assert!(page.is_running(k));
        let c = page.queue_config(k, TX).unwrap();
        let mut tx = Driver::new(c.num, c.pfn);
        mem.write(0x1000, b"hi\n").unwrap();
        tx.add(&mut mem, &[(0x1000, 3, false)]).unwrap();
        notify(
            c.pfn << 12,
            &mut mem,
            &mut page,
            &mut con,
            &mut out,
            &mut irqs,
        )
        .unwrap();
        assert_eq!(out, b"hi\n");
        assert_eq!(irqs, [c.irq]);
        notify(0x1000, &mut mem, &mut page, &mut con, &mut out, &mut irqs).unwrap();
        assert!(out.ends_with(b"[early 0x1000]"));
        // A hostile ring: the error names it, the launcher kills the guest.
        tx.set_avail_idx(&mut mem, tx.avail_idx.wrapping_add(0x8000));
        let e = notify(
            c.pfn << 12,
            &mut mem,
            &mut page,
            &mut con,
            &mut out,
            &mut irqs,
        )
        .unwrap_err();
        assert_eq!(e.to_string(), "guest moved avail index from 1 to 32769");
        // Reset: rings zeroed, device stopped; the guest can start again.
        mem.write_u8(status + 4, 0).unwrap();
        notify(status, &mut mem, &mut page, &mut con, &mut out, &mut irqs).unwrap();
        assert!(!page.is_running(k) && con.queues_mut().is_empty());
        assert_eq!(mem.read_u16((c.pfn << 12) + 128 * 16 + 2).unwrap(), 0);
        mem.write_u8(status + 4, 7).unwrap();
        notify(status, &mut mem, &mut page, &mut con, &mut out, &mut irqs).unwrap();
        let mut tx = Driver::new(c.num, c.pfn);
        mem.write(0x1000, b"again").unwrap();
        tx.add(&mut mem, &[(0x1000, 5, false)]).unwrap();
        notify(
            c.pfn << 12,
            &mut mem,
            &mut page,
            &mut con,
            &mut out,
            &mut irqs,
        )
        .unwrap();
        assert!(out.ends_with(b"again"));
    }
}
