//! A bounded frame queue between a capture thread and its camera's worker: when full, a live
//! source drops the oldest frame (counted) so the streaming thread never waits on inference; an
//! offline source (a file decoded as fast as possible) waits for room instead.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Condvar, Mutex};
use std::time::Duration;

/// What a capture thread hands to its worker.
#[derive(Debug)]
pub enum Item<T> {
    Frame(T),
    /// The source is offline (error, reconnecting); frames resume later.
    Offline(String),
    /// The source is back.
    Online,
    /// The source has ended for good (file EOS without loop, or shutdown).
    End,
}

impl<T> Item<T> {
    /// The same item with its frame (if it is one) turned into `f(frame)`; markers stay.
    pub fn map<U>(self, f: impl FnOnce(T) -> U) -> Item<U> {
        match self {
            Item::Frame(frame) => Item::Frame(f(frame)),
            Item::Offline(why) => Item::Offline(why),
            Item::Online => Item::Online,
            Item::End => Item::End,
        }
    }
}

/// Frames (not markers) waiting in `items`: the capacity counts frames only.
fn frames_in<T>(items: &VecDeque<Item<T>>) -> usize {
    items.iter().filter(|i| matches!(i, Item::Frame(_))).count()
}

/// Bounded multi-producer, single-consumer queue with drop-oldest or blocking push.
pub struct FrameQueue<T> {
    items: Mutex<VecDeque<Item<T>>>,
    changed: Condvar,
    capacity: usize,
    dropped: AtomicU64,
}

impl<T> FrameQueue<T> {
    pub fn new(capacity: usize) -> Self {
        Self {
            items: Mutex::new(VecDeque::with_capacity(capacity.max(1))),
            changed: Condvar::new(),
            capacity: capacity.max(1),
            dropped: AtomicU64::new(0),
        }
    }

    /// Frames dropped because the worker was behind.
    pub fn dropped(&self) -> u64 {
        self.dropped.load(Ordering::Relaxed)
    }

    /// Adds `item` at once. A frame arriving at a full queue drops the oldest frame (counted);
    /// markers (state changes, the end) are never dropped and never displace a frame.
    pub fn push_drop_oldest(&self, item: Item<T>) {
        let Ok(mut items) = self.items.lock() else {
            return;
        };
        if matches!(item, Item::Frame(_))
            && frames_in(&items) >= self.capacity
            && let Some(position) = items.iter().position(|i| matches!(i, Item::Frame(_)))
        {
            items.remove(position);
            self.dropped.fetch_add(1, Ordering::Relaxed);
        }
        items.push_back(item);
        self.changed.notify_all();
    }

    /// Adds `item`, waiting while the queue is full (frames only; markers go in at once).
    /// Returns `false` if `give_up` became true while waiting.
    pub fn push_wait(&self, item: Item<T>, give_up: &dyn Fn() -> bool) -> bool {
        let Ok(mut items) = self.items.lock() else {
            return false;
        };
        while matches!(item, Item::Frame(_)) && frames_in(&items) >= self.capacity {
            if give_up() {
                return false;
            }
            items = match self.changed.wait_timeout(items, Duration::from_millis(50)) {
                Ok((guard, _)) => guard,
                Err(_) => return false,
            };
        }
        items.push_back(item);
        self.changed.notify_all();
        true
    }

    /// The oldest item, waiting up to `timeout`.
    pub fn pop(&self, timeout: Duration) -> Option<Item<T>> {
        let Ok(mut items) = self.items.lock() else {
            return None;
        };
        if items.is_empty() {
            items = match self.changed.wait_timeout(items, timeout) {
                Ok((guard, _)) => guard,
                Err(_) => return None,
            };
        }
        let item = items.pop_front();
        if item.is_some() {
            self.changed.notify_all();
        }
        item
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn full_queue_drops_the_oldest_frame_but_keeps_markers() {
        let queue = FrameQueue::new(2);
        queue.push_drop_oldest(Item::Frame(1));
        queue.push_drop_oldest(Item::Offline("x".into()));
        queue.push_drop_oldest(Item::Frame(2));
        queue.push_drop_oldest(Item::Frame(3));
        assert_eq!(queue.dropped(), 1);
        let order: Vec<String> = std::iter::from_fn(|| queue.pop(Duration::ZERO))
            .map(|i| format!("{i:?}"))
            .collect();
        assert_eq!(order, vec!["Offline(\"x\")", "Frame(2)", "Frame(3)"]);
        // The end marker joins a full queue without displacing a frame.
        queue.push_drop_oldest(Item::Frame(4));
        queue.push_drop_oldest(Item::Frame(5));
        queue.push_drop_oldest(Item::End);
        assert_eq!(queue.dropped(), 1);
        let order: Vec<String> = std::iter::from_fn(|| queue.pop(Duration::ZERO))
            .map(|i| format!("{i:?}"))
            .collect();
        assert_eq!(order, vec!["Frame(4)", "Frame(5)", "End"]);
    }

    #[test]
    fn waiting_push_resumes_when_the_consumer_takes_a_frame() {
        let queue = std::sync::Arc::new(FrameQueue::new(1));
        queue.push_drop_oldest(Item::Frame(1));
        let producer = {
            let queue = queue.clone();
            std::thread::spawn(move || queue.push_wait(Item::Frame(2), &|| false))
        };
        std::thread::sleep(Duration::from_millis(100));
        assert!(matches!(
            queue.pop(Duration::from_secs(1)),
            Some(Item::Frame(1))
        ));
        assert!(producer.join().unwrap_or(false));
        assert!(matches!(
            queue.pop(Duration::from_secs(1)),
            Some(Item::Frame(2))
        ));
        assert_eq!(queue.dropped(), 0);
    }
}
