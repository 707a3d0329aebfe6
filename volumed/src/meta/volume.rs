//! The volume record: a volume's identity, settings and current head.
//!
//! Encoding (version 1): `0x01 id[16] org_len org name_len name chunking(u8) created_ms
//! head[32] seq` with varints as in [`volume_model::node`].

use chunkstore::Chunking;

use volume_model::codec::{DecodeError, Reader, Writer};
use volume_model::volume_name::MAX_VOLUME_NAME;
use volume_model::{CommitId, VolumeId};

/// A volume as stored in the `volumes` column family.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct VolumeRecord {
    /// Stable identity.
    pub id: VolumeId,
    /// Owning org.
    pub org: String,
    /// Name, unique within the org.
    pub name: String,
    /// Chunker for new files.
    pub chunking: Chunking,
    /// Creation time, ms since the Unix epoch.
    pub created_ms: u64,
    /// Current head commit.
    pub head: CommitId,
    /// Sequence number of the head commit.
    pub seq: u64,
}

impl VolumeRecord {
    /// Encodes the record.
    pub fn encode(&self) -> Vec<u8> {
        let mut w = Writer::default();
        w.u8(1);
        w.raw(&self.id.0);
        w.bytes(self.org.as_bytes());
        w.bytes(self.name.as_bytes());
        w.u8(match self.chunking {
            Chunking::Fixed => 1,
            Chunking::FastCdc => 2,
        });
        w.varint(self.created_ms);
        w.raw(self.head.as_bytes());
        w.varint(self.seq);
        w.buf
    }

    /// Decodes a record.
    pub fn decode(data: &[u8]) -> Result<Self, DecodeError> {
        let mut r = Reader::new(data, "volume record");
        if r.u8()? != 1 {
            return Err(r.err("unsupported version"));
        }
        let mut id = [0u8; 16];
        id.copy_from_slice(r.raw(16)?);
        let org = r.string(MAX_VOLUME_NAME, "org length")?.to_owned();
        let name = r.string(MAX_VOLUME_NAME, "name length")?.to_owned();
        let chunking = match r.u8()? {
            1 => Chunking::Fixed,
            2 => Chunking::FastCdc,
            other => return Err(r.err(format!("unknown chunking {other}"))),
        };
        let created_ms = r.varint()?;
        let head = CommitId::from_bytes(r.id32()?);
        let seq = r.varint()?;
        r.finish()?;
        Ok(Self { id: VolumeId(id), org, name, chunking, created_ms, head, seq })
    }
}
