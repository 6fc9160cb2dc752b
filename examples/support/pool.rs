//! A fixed pool of threads as a cache's refresh spawner, shared by the examples (included with
//! `#[path]`; not an example itself).

use std::sync::mpsc;
use std::sync::{Arc, Mutex};

/// `threads` workers taking jobs from a queue; they exit when the returned spawner (owned by
/// the cache) is dropped.
pub fn pool(threads: usize) -> impl Fn(Box<dyn FnOnce() + Send>) + Send + Sync + 'static {
    let (tx, rx) = mpsc::channel::<Box<dyn FnOnce() + Send>>();
    let rx = Arc::new(Mutex::new(rx));
    for _ in 0..threads {
        let rx = Arc::clone(&rx);
        std::thread::spawn(move || loop {
            let job = rx.lock().unwrap().recv();
            match job {
                Ok(job) => job(),
                Err(_) => return,
            }
        });
    }
    move |job| {
        let _ = tx.send(job);
    }
}
