//! Where a rank stands in its world and where rank 0 listens, given the way torchrun
//! and SLURM launchers give it: `WORLD_SIZE`, `RANK`, `LOCAL_RANK`, `MASTER_ADDR`,
//! `MASTER_PORT` (or flags of the same names).

use crate::error::{Error, Result};

/// A rank's place in a data-parallel world.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Rendezvous {
    /// Ranks in the world (all nodes).
    pub world_size: usize,
    /// This process's rank, `0..world_size`.
    pub rank: usize,
    /// Its rank on this node: the GPU ordinal it uses.
    pub local_rank: usize,
    /// Host of rank 0 (name or address).
    pub master_addr: String,
    /// Port rank 0 listens on for the rendezvous.
    pub master_port: u16,
}

impl Rendezvous {
    /// From the environment: `WORLD_SIZE` and `RANK` (`None` when `WORLD_SIZE` is
    /// unset: not a distributed launch), `LOCAL_RANK` (default `RANK`), `MASTER_ADDR`
    /// (default `127.0.0.1`), `MASTER_PORT` (default 29500, torchrun's). SLURM's
    /// `SLURM_NTASKS`, `SLURM_PROCID`, `SLURM_LOCALID` stand in for the first three.
    pub fn from_env() -> Result<Option<Rendezvous>> {
        Self::from_vars(|k| std::env::var(k).ok())
    }

    /// As [`Rendezvous::from_env`], reading variables through `get`.
    pub fn from_vars(get: impl Fn(&str) -> Option<String>) -> Result<Option<Rendezvous>> {
        let pick = |a: &str, b: &str| get(a).or_else(|| get(b));
        let Some(world) = pick("WORLD_SIZE", "SLURM_NTASKS") else {
            return Ok(None);
        };
        let num = |name: &str, v: String| -> Result<usize> {
            v.trim()
                .parse()
                .map_err(|_| Error::invalid("rendezvous", format!("{name}=`{v}` is not a number")))
        };
        let world_size = num("WORLD_SIZE", world)?;
        let rank = match pick("RANK", "SLURM_PROCID") {
            Some(v) => num("RANK", v)?,
            None => {
                return Err(Error::invalid(
                    "rendezvous",
                    "WORLD_SIZE is set but RANK is not",
                ))
            }
        };
        let local_rank = match pick("LOCAL_RANK", "SLURM_LOCALID") {
            Some(v) => num("LOCAL_RANK", v)?,
            None => rank,
        };
        let master_port = match get("MASTER_PORT") {
            Some(v) => v.trim().parse().map_err(|_| {
                Error::invalid("rendezvous", format!("MASTER_PORT=`{v}` is not a port"))
            })?,
            None => 29500,
        };
        let r = Rendezvous {
            world_size,
            rank,
            local_rank,
            master_addr: get("MASTER_ADDR").unwrap_or_else(|| "127.0.0.1".into()),
            master_port,
        };
        r.validate()?;
        Ok(Some(r))
    }

    /// An error unless `rank < world_size`.
    pub fn validate(&self) -> Result<()> {
        if self.world_size == 0 || self.rank >= self.world_size {
            return Err(Error::invalid(
                "rendezvous",
                format!("RANK {} with WORLD_SIZE {}", self.rank, self.world_size),
            ));
        }
        Ok(())
    }

    /// The variables a launcher sets for this rank (for spawning workers).
    pub fn env(&self) -> Vec<(&'static str, String)> {
        vec![
            ("WORLD_SIZE", self.world_size.to_string()),
            ("RANK", self.rank.to_string()),
            ("LOCAL_RANK", self.local_rank.to_string()),
            ("MASTER_ADDR", self.master_addr.clone()),
            ("MASTER_PORT", self.master_port.to_string()),
        ]
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn vars<'a>(v: &'a [(&'a str, &'a str)]) -> impl Fn(&str) -> Option<String> + 'a {
        move |k| v.iter().find(|(n, _)| *n == k).map(|(_, x)| x.to_string())
    }

    #[test]
    fn reads_torchrun_and_slurm_variables() {
        assert_eq!(Rendezvous::from_vars(vars(&[])).unwrap(), None);
        let r = Rendezvous::from_vars(vars(&[
            ("WORLD_SIZE", "8"),
            ("RANK", "5"),
            ("LOCAL_RANK", "1"),
            ("MASTER_ADDR", "node0"),
            ("MASTER_PORT", "1234"),
        ]))
        .unwrap()
        .unwrap();
        assert_eq!((r.world_size, r.rank, r.local_rank), (8, 5, 1));
        assert_eq!((r.master_addr.as_str(), r.master_port), ("node0", 1234));
        let s = Rendezvous::from_vars(vars(&[
            ("SLURM_NTASKS", "4"),
            ("SLURM_PROCID", "3"),
            ("SLURM_LOCALID", "3"),
        ]))
        .unwrap()
        .unwrap();
        assert_eq!((s.world_size, s.rank, s.master_port), (4, 3, 29500));
        assert!(Rendezvous::from_vars(vars(&[("WORLD_SIZE", "2"), ("RANK", "2")])).is_err());
        assert!(Rendezvous::from_vars(vars(&[("WORLD_SIZE", "2")])).is_err());
        assert!(Rendezvous::from_vars(vars(&[("WORLD_SIZE", "x"), ("RANK", "0")])).is_err());
    }
}
