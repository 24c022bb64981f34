// SPDX-License-Identifier: Apache-2.0

//! The vring type of the device: vhost-user-backend's [`VringRwLock`], except that a
//! running ring's used index is never taken back from guest memory.
//!
//! vhost-user-backend 0.24 answers every SET_VRING_ADDR by reading the used index from
//! guest memory and making it the ring's next used index (for a ring a guest driver
//! reset). QEMU also sends SET_VRING_ADDR to a *running* ring, when it turns dirty-page
//! logging on or off for a migration. The read and the store are two separate lock
//! holds, so a request completed by a queue worker between them is forgotten: the next
//! completion overwrites its used entry and the guest waits for it forever.
//!
//! Invariant kept here: **while a ring is ready (started by SET_VRING_KICK, not yet
//! stopped by GET_VRING_BASE), its next used index is the queue's own count**, which a
//! queue worker alone advances. A ring that is not ready takes the index as before.

use std::fs::File;
use std::io;

use vhost_user_backend::{VringRwLock, VringStateGuard, VringStateMutGuard, VringT};
use virtio_queue::{Error as VirtQueError, QueueT};
use vm_memory::GuestAddressSpace;

/// A vring whose used index a running queue owns (see the module documentation).
#[derive(Clone)]
pub struct FrontVring<M: GuestAddressSpace>(VringRwLock<M>);

impl<'a, M: 'a + GuestAddressSpace> VringStateGuard<'a, M> for FrontVring<M> {
    type G = <VringRwLock<M> as VringStateGuard<'a, M>>::G;
}

impl<'a, M: 'a + GuestAddressSpace> VringStateMutGuard<'a, M> for FrontVring<M> {
    type G = <VringRwLock<M> as VringStateMutGuard<'a, M>>::G;
}

impl<M: 'static + GuestAddressSpace> VringT<M> for FrontVring<M> {
    fn new(mem: M, max_queue_size: u16) -> Result<Self, VirtQueError> {
        VringRwLock::new(mem, max_queue_size).map(FrontVring)
    }

    fn get_ref(&self) -> <Self as VringStateGuard<'_, M>>::G {
        self.0.get_ref()
    }

    fn get_mut(&self) -> <Self as VringStateMutGuard<'_, M>>::G {
        self.0.get_mut()
    }

    fn add_used(&self, desc_index: u16, len: u32) -> Result<(), VirtQueError> {
        self.0.add_used(desc_index, len)
    }

    fn signal_used_queue(&self) -> io::Result<()> {
        self.0.signal_used_queue()
    }

    fn enable_notification(&self) -> Result<bool, VirtQueError> {
        self.0.enable_notification()
    }

    fn disable_notification(&self) -> Result<(), VirtQueError> {
        self.0.disable_notification()
    }

    fn needs_notification(&self) -> Result<bool, VirtQueError> {
        self.0.needs_notification()
    }

    fn set_enabled(&self, enabled: bool) {
        self.0.set_enabled(enabled)
    }

    fn set_queue_info(
        &self,
        desc_table: u64,
        avail_ring: u64,
        used_ring: u64,
    ) -> Result<(), VirtQueError> {
        self.0.set_queue_info(desc_table, avail_ring, used_ring)
    }

    fn queue_next_avail(&self) -> u16 {
        self.0.queue_next_avail()
    }

    fn set_queue_next_avail(&self, base: u16) {
        self.0.set_queue_next_avail(base)
    }

    fn set_queue_next_used(&self, idx: u16) {
        // Under the write lock: a queue worker cannot complete a request between the
        // check and the store.
        let mut state = self.0.get_mut();
        let queue = state.get_queue_mut();
        if !queue.ready() {
            queue.set_next_used(idx);
        }
    }

    fn queue_used_idx(&self) -> Result<u16, VirtQueError> {
        self.0.queue_used_idx()
    }

    fn set_queue_size(&self, num: u16) {
        self.0.set_queue_size(num)
    }

    fn set_queue_event_idx(&self, enabled: bool) {
        self.0.set_queue_event_idx(enabled)
    }

    fn set_queue_ready(&self, ready: bool) {
        self.0.set_queue_ready(ready)
    }

    fn set_kick(&self, file: Option<File>) {
        self.0.set_kick(file)
    }

    fn read_kick(&self) -> io::Result<bool> {
        self.0.read_kick()
    }

    fn set_call(&self, file: Option<File>) {
        self.0.set_call(file)
    }

    fn set_err(&self, file: Option<File>) {
        self.0.set_err(file)
    }
}
