//! `stpm run --shard i/n`: one process's share of a pipeline file's cameras, so that `n` processes
//! (a StatefulSet's pods, say) on one file each analyse different cameras and together all of them.
//! Camera `k` of the file (counted from 0) belongs to shard `k mod n`: shares differ by at most one
//! camera, and a camera added at the end of the file moves no other.

use std::fmt;
use std::str::FromStr;

/// Shard `index` of `count` (`0 <= index < count`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Shard {
    pub index: usize,
    pub count: usize,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ShardError {
    #[error("--shard {0:?}: expected INDEX/COUNT, e.g. 0/3 (INDEX counts from 0)")]
    Syntax(String),
    #[error("--shard {index}/{count}: INDEX must be below COUNT (shards 0 to {last} of {count})", last = .count.saturating_sub(1))]
    OutOfRange { index: usize, count: usize },
    #[error(
        "--shard {index}/{count} has no camera: the pipeline has {cameras}, so at most {cameras} shards get one"
    )]
    Empty {
        index: usize,
        count: usize,
        cameras: usize,
    },
}

impl FromStr for Shard {
    type Err = ShardError;

    fn from_str(text: &str) -> Result<Self, Self::Err> {
        let syntax = || ShardError::Syntax(text.to_owned());
        let (index, count) = text.trim().split_once('/').ok_or_else(syntax)?;
        let index: usize = index.trim().parse().map_err(|_| syntax())?;
        let count: usize = count.trim().parse().map_err(|_| syntax())?;
        if count == 0 || index >= count {
            return Err(ShardError::OutOfRange { index, count });
        }
        Ok(Self { index, count })
    }
}

impl fmt::Display for Shard {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.index, self.count)
    }
}

impl Shard {
    /// Whether camera number `position` of the file (from 0) is this shard's.
    pub fn owns(&self, position: usize) -> bool {
        position % self.count == self.index
    }

    /// Keeps this shard's cameras of `cameras`, in file order; refuses a share with none.
    pub fn select<T>(&self, cameras: Vec<T>) -> Result<Vec<T>, ShardError> {
        let total = cameras.len();
        let kept: Vec<T> = cameras
            .into_iter()
            .enumerate()
            .filter(|(position, _)| self.owns(*position))
            .map(|(_, camera)| camera)
            .collect();
        if kept.is_empty() {
            return Err(ShardError::Empty {
                index: self.index,
                count: self.count,
                cameras: total,
            });
        }
        Ok(kept)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_index_over_count_and_refuses_the_rest() {
        assert_eq!("1/3".parse(), Ok(Shard { index: 1, count: 3 }));
        assert_eq!(" 0 / 1 ".parse(), Ok(Shard { index: 0, count: 1 }));
        for bad in ["", "1", "a/3", "1/b", "-1/3", "1/3/4"] {
            assert!(
                matches!(bad.parse::<Shard>(), Err(ShardError::Syntax(_))),
                "{bad}"
            );
        }
        assert_eq!(
            "3/3".parse::<Shard>(),
            Err(ShardError::OutOfRange { index: 3, count: 3 })
        );
        assert!(matches!(
            "0/0".parse::<Shard>(),
            Err(ShardError::OutOfRange { .. })
        ));
    }

    #[test]
    fn shards_of_one_file_are_disjoint_and_cover_every_camera() {
        for cameras in 1..9 {
            for count in 1..=cameras {
                let mut owners = vec![0; cameras];
                for index in 0..count {
                    let shard = Shard { index, count };
                    let mine = (0..cameras).filter(|&k| shard.owns(k)).count();
                    assert!(mine >= cameras / count && mine <= cameras.div_ceil(count));
                    for (k, owner) in owners.iter_mut().enumerate() {
                        *owner += usize::from(shard.owns(k));
                    }
                }
                assert!(owners.iter().all(|&n| n == 1), "{cameras} {count}");
            }
        }
    }

    #[test]
    fn a_shard_without_a_camera_is_refused() {
        let shard = Shard { index: 2, count: 3 };
        assert_eq!(shard.select(vec!['a', 'b', 'c', 'd']), Ok(vec!['c']));
        assert_eq!(
            shard.select(Vec::<u8>::new()),
            Err(ShardError::Empty {
                index: 2,
                count: 3,
                cameras: 0
            })
        );
    }
}
