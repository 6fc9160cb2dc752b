//! Test support shared by herdcache's tests and examples (not published): a throwaway
//! `redis-server` to run the second tier against, and pieces of the history checkers.

pub mod history;
pub mod redis_server;
