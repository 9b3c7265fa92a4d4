//! 3GPP CDR files: TS 32.297 file framing around TS 32.298 BER records, read with `asn1-rs`'s
//! BER TLV reader and a tag map for the fields operators use. One record per CDR.
//!
//! ```text
//! file    = file header (header length bytes) · CDR*
//! header  = file length u32 · header length u32 · high release u8 · low release u8 ·
//!           opening ts u32 · last CDR ts u32 · CDR count u32 · file seq u32 ·
//!           closure reason u8 · node IP [20] · lost CDR indicator u8 · routing filter
//!           (u16 length + bytes) · private extension (u16 length + bytes) · release ext …
//! CDR     = length u16 · release/version u8 · format (3 bits, 1 = BER) / TS number (5 bits) u8 ·
//!           release extension u8 · BER record (length bytes)
//! ```
//! (all integers big-endian). The BER record is the `CallEventRecord` CHOICE (IMPLICIT tags):
//! `[1]` moCallRecord, `[78]` sGWRecord, `[79]` pGWRecord and `[200]` chargingFunctionRecord
//! (the 5G CHF record of an SMF's PDU session) are mapped; other record types make
//! a record with only `record_type = "unmapped"` and `record_tag`, so no unmapped field (and no
//! personal data in it) is ever forwarded.
//!
//! ```text
//! | field | moCallRecord [1] | sGW/pGWRecord [78]/[79] | chargingFunctionRecord [200] (SMF) |
//! |---|---|---|---|
//! | `record_type_id` | recordType [0] | recordType [0] | recordType [0] |
//! | `imsi` | servedIMSI [1] (TBCD) | servedIMSI [3] (TBCD) | subscriberIdentifier [2], type 1: data [1] less "imsi-" |
//! | `imei` | servedIMEI [2] (TBCD) | servedIMEISV [29] (TBCD) | pDUSessionChargingInformation [13] › userEquipmentInfo [2] › data [1] less "imei(sv)-" |
//! | `msisdn` | servedMSISDN [3] (AddressString) | servedMSISDN [22] (AddressString) | subscriberIdentifier [2], type 0: data [1] less "msisdn-" |
//! | `calling_number`, `called_number` | [4], [5] | — | — |
//! | `start_time` | answerTime [23], else seizureTime [22] | recordOpeningTime [13] | recordOpeningTime [6] |
//! | `duration_s` | callDuration [25] | duration [14] | duration [7] |
//! | `cause_for_closing` | causeForTerm [30] | causeForRecClosing [15] | causeForRecClosing [9] |
//! | `cell` | location [12]: LAC [0] · cell id [1] | userLocationInformation [32]: ECGI, else hex | [13] › userLocationInformation [3], hex |
//! | `charging_id` | callReference [32] (hex) | chargingID [5] | chargingID [27], else [13] › pDUSessionChargingID [0] |
//! | `apn` | — | accessPointNameNI [7] | [13] › dataNetworkNameIdentifier [13] |
//! | `uplink_bytes`, `downlink_bytes` | — | sums over listOfTrafficVolumes [12] (items [3], [4]) and listOfServiceData [34] (items [12], [13]) | sums over listOfMultipleUnitUsage [5] › usedUnitContainers [1] (items [5], [6]) |
//! ```

use asn1_rs::{Any, Class, FromBer};

use super::record::{Fields, Value, hex};

/// Smallest TS 32.297 file header: the fixed part up to the routing filter length.
const FILE_HEADER_BYTES_MIN: usize = 50;
/// A CDR's own header.
const CDR_HEADER_BYTES: usize = 5;
/// BER nesting this reader follows (the mapped fields sit at most 3 deep).
const DEPTH_MAX: usize = 4;

/// Decodes a whole CDR file.
pub fn decode_file(file: &[u8], records_max: usize) -> Result<Vec<Fields>, String> {
    if file.len() < FILE_HEADER_BYTES_MIN {
        return Err(format!("CDR file: {} bytes, shorter than a file header ({FILE_HEADER_BYTES_MIN})", file.len()));
    }
    let u32_at = |o: usize| u32::from_be_bytes([file[o], file[o + 1], file[o + 2], file[o + 3]]);
    let file_len = u32_at(0) as usize;
    let header_len = u32_at(4) as usize;
    let count = u32_at(18);
    if file_len != file.len() {
        return Err(format!("CDR file: header says {file_len} bytes, the payload is {}", file.len()));
    }
    if header_len < FILE_HEADER_BYTES_MIN || header_len > file.len() {
        return Err(format!("CDR file: header length {header_len} outside {FILE_HEADER_BYTES_MIN}..={}", file.len()));
    }
    let mut out = Vec::new();
    let mut at = header_len;
    while at < file.len() {
        let i = out.len();
        if file.len() - at < CDR_HEADER_BYTES {
            return Err(format!("CDR {i} at byte {at}: truncated CDR header"));
        }
        let len = usize::from(u16::from_be_bytes([file[at], file[at + 1]]));
        let format = file[at + 3] >> 5;
        let body = at + CDR_HEADER_BYTES;
        if len > file.len() - body {
            return Err(format!("CDR {i} at byte {at}: length {len} runs past the end of the file"));
        }
        if format != 1 {
            return Err(format!("CDR {i} at byte {at}: data record format {format}, only 1 (BER) is read"));
        }
        if out.len() == records_max {
            return Err(format!("CDR file: more than records_per_payload_max {records_max} CDRs"));
        }
        out.push(decode_record(&file[body..body + len]).map_err(|e| format!("CDR {i} at byte {at}: {e}"))?);
        at = body + len;
    }
    if count != u32::MAX && count as usize != out.len() {
        return Err(format!("CDR file: header counts {count} CDRs, the file holds {}", out.len()));
    }
    Ok(out)
}

/// Decodes one BER `CallEventRecord`.
pub fn decode_record(ber: &[u8]) -> Result<Fields, String> {
    let (rest, any) = Any::from_ber(ber).map_err(|e| format!("BER: {e}"))?;
    if !rest.is_empty() {
        return Err(format!("BER: {} bytes after the record", rest.len()));
    }
    let h = &any.header;
    if h.class() != Class::ContextSpecific || !h.is_constructed() {
        return Err(format!("BER: expected a [n] constructed CallEventRecord, got {:?} tag {}", h.class(), h.tag().0));
    }
    let tag = h.tag().0;
    let kind = match tag {
        1 => Kind::MoCall,
        78 => Kind::Sgw,
        79 => Kind::Pgw,
        200 => Kind::Smf,
        _ => {
            return Ok(Fields(vec![
                ("record_type".into(), Value::Str("unmapped".into())),
                ("record_tag".into(), Value::Int(i64::from(tag))),
            ]));
        }
    };
    let mut r = Cdr::default();
    for (t, child) in children(any.data, 0)? {
        r.field(kind, t, &child)?;
    }
    Ok(r.into_fields(kind))
}

#[derive(Clone, Copy, PartialEq)]
enum Kind {
    MoCall,
    Sgw,
    Pgw,
    Smf,
}

/// A TLV as this reader keeps it: constructed or not, and its content.
struct Tlv<'a> {
    constructed: bool,
    data: &'a [u8],
}

/// The context-tagged children of a constructed value's content.
fn children(data: &[u8], depth: usize) -> Result<Vec<(u32, Tlv<'_>)>, String> {
    if depth >= DEPTH_MAX {
        return Err(format!("BER: nested deeper than {DEPTH_MAX}"));
    }
    let mut out = Vec::new();
    let mut rest = data;
    while !rest.is_empty() {
        if rest.len() >= 2 && rest[0] == 0 && rest[1] == 0 {
            break; // end-of-contents of an indefinite length
        }
        let (r, any) =
            Any::from_ber(rest).map_err(|e| format!("BER at content byte {}: {e}", data.len() - rest.len()))?;
        let t = any.header.tag().0;
        if any.header.class() == Class::ContextSpecific {
            out.push((t, Tlv { constructed: any.header.is_constructed(), data: any.data }));
        }
        rest = r;
    }
    Ok(out)
}

#[derive(Default)]
struct Cdr {
    record_type_id: Option<i64>,
    imsi: Option<String>,
    imei: Option<String>,
    msisdn: Option<String>,
    calling: Option<String>,
    called: Option<String>,
    seizure: Option<String>,
    answer: Option<String>,
    opening: Option<String>,
    duration: Option<i64>,
    cause: Option<i64>,
    cell: Option<String>,
    charging_id: Option<Value>,
    apn: Option<String>,
    uplink: Option<i64>,
    downlink: Option<i64>,
}

impl Cdr {
    fn field(&mut self, kind: Kind, tag: u32, v: &Tlv<'_>) -> Result<(), String> {
        let name = |n: &'static str| move |e: String| format!("[{tag}] {n}: {e}");
        match (kind, tag) {
            (_, 0) => self.record_type_id = Some(integer(v.data).map_err(name("recordType"))?),
            (Kind::MoCall, 1) | (Kind::Sgw | Kind::Pgw, 3) => {
                self.imsi = Some(tbcd(v.data).map_err(name("servedIMSI"))?)
            }
            (Kind::MoCall, 2) | (Kind::Sgw | Kind::Pgw, 29) => {
                self.imei = Some(tbcd(v.data).map_err(name("servedIMEI"))?)
            }
            (Kind::MoCall, 3) | (Kind::Sgw | Kind::Pgw, 22) => {
                self.msisdn = Some(address(v.data).map_err(name("servedMSISDN"))?);
            }
            (Kind::MoCall, 4) => self.calling = Some(address(v.data).map_err(name("callingNumber"))?),
            (Kind::MoCall, 5) => self.called = Some(address(v.data).map_err(name("calledNumber"))?),
            (Kind::MoCall, 12) if v.constructed => self.cell = Some(lac_ci(v.data).map_err(name("location"))?),
            (Kind::MoCall, 22) => self.seizure = Some(timestamp(v.data).map_err(name("seizureTime"))?),
            (Kind::MoCall, 23) => self.answer = Some(timestamp(v.data).map_err(name("answerTime"))?),
            (Kind::MoCall, 25) | (Kind::Sgw | Kind::Pgw, 14) => {
                self.duration = Some(integer(v.data).map_err(name("duration"))?);
            }
            (Kind::MoCall, 30) | (Kind::Sgw | Kind::Pgw, 15) => {
                self.cause = Some(integer(v.data).map_err(name("cause for closing"))?);
            }
            (Kind::MoCall, 32) => self.charging_id = Some(Value::Str(hex(v.data))),
            (Kind::Sgw | Kind::Pgw, 5) => {
                self.charging_id = Some(Value::Int(integer(v.data).map_err(name("chargingID"))?))
            }
            (Kind::Sgw | Kind::Pgw, 7) => {
                self.apn = Some(
                    String::from_utf8(v.data.to_vec()).map_err(|_| "[7] accessPointNameNI: not text".to_string())?,
                );
            }
            (Kind::Sgw | Kind::Pgw, 13) => self.opening = Some(timestamp(v.data).map_err(name("recordOpeningTime"))?),
            (Kind::Sgw | Kind::Pgw, 32) => self.cell = Some(uli_cell(v.data)),
            (Kind::Sgw | Kind::Pgw, 12) if v.constructed => {
                self.volumes(v.data, 3, 4).map_err(name("listOfTrafficVolumes"))?
            }
            (Kind::Sgw | Kind::Pgw, 34) if v.constructed => {
                self.volumes(v.data, 12, 13).map_err(name("listOfServiceData"))?
            }
            (Kind::Smf, 2) if v.constructed => self.subscription_id(v.data).map_err(name("subscriberIdentifier"))?,
            (Kind::Smf, 5) if v.constructed => self.unit_usage(v.data).map_err(name("listOfMultipleUnitUsage"))?,
            (Kind::Smf, 6) => self.opening = Some(timestamp(v.data).map_err(name("recordOpeningTime"))?),
            (Kind::Smf, 7) => self.duration = Some(integer(v.data).map_err(name("duration"))?),
            (Kind::Smf, 9) => self.cause = Some(integer(v.data).map_err(name("causeForRecClosing"))?),
            (Kind::Smf, 13) if v.constructed => {
                self.pdu_session(v.data).map_err(name("pDUSessionChargingInformation"))?
            }
            (Kind::Smf, 27) => self.charging_id = Some(Value::Int(integer(v.data).map_err(name("chargingID"))?)),
            _ => {}
        }
        Ok(())
    }

    /// SubscriptionID: `[0]` type (0 E.164, 1 IMSI, …), `[1]` data (UTF-8, e.g. `imsi-…`).
    fn subscription_id(&mut self, data: &[u8]) -> Result<(), String> {
        let (mut kind, mut id) = (None, None);
        for (t, v) in children(data, 2)? {
            match t {
                0 => kind = Some(integer(v.data)?),
                1 => id = Some(text(v.data)?),
                _ => {}
            }
        }
        match (kind, id) {
            (Some(1), Some(id)) => self.imsi = Some(id.strip_prefix("imsi-").unwrap_or(&id).to_owned()),
            (Some(0), Some(id)) => self.msisdn = Some(id.strip_prefix("msisdn-").unwrap_or(&id).to_owned()),
            (None, _) | (_, None) => {
                return Err("subscriptionIDType [0] and subscriptionIDData [1] are both needed".into());
            }
            _ => {} // SIP URI, NAI, private: not mapped
        }
        Ok(())
    }

    /// PDUSessionChargingInformation: charging id [0], equipment [2], location [3], DNN [13].
    fn pdu_session(&mut self, data: &[u8]) -> Result<(), String> {
        for (t, v) in children(data, 2)? {
            match t {
                0 if self.charging_id.is_none() => self.charging_id = Some(Value::Int(integer(v.data)?)),
                2 if v.constructed => {
                    for (t2, e) in children(v.data, 3)? {
                        if t2 == 1 {
                            let id = text(e.data)?;
                            let id = id.strip_prefix("imeisv-").or_else(|| id.strip_prefix("imei-")).unwrap_or(&id);
                            self.imei = Some(id.to_owned());
                        }
                    }
                }
                3 => self.cell = Some(hex(v.data)),
                13 => self.apn = Some(text(v.data)?),
                _ => {}
            }
        }
        Ok(())
    }

    /// listOfMultipleUnitUsage: SEQUENCE OF { …, usedUnitContainers [1] SEQUENCE OF { …,
    /// dataVolumeUplink [5], dataVolumeDownlink [6] } }.
    fn unit_usage(&mut self, list: &[u8]) -> Result<(), String> {
        for usage in items(list)? {
            for (t, containers) in children(usage, 2)? {
                if t == 1 && containers.constructed {
                    self.volumes(containers.data, 5, 6)?;
                }
            }
        }
        Ok(())
    }

    /// Sums the uplink (`up`) and downlink (`down`) volumes of a SEQUENCE OF containers.
    fn volumes(&mut self, list: &[u8], up: u32, down: u32) -> Result<(), String> {
        let mut rest = list;
        while !rest.is_empty() {
            if rest.len() >= 2 && rest[0] == 0 && rest[1] == 0 {
                break;
            }
            let (r, item) = Any::from_ber(rest).map_err(|e| format!("BER: {e}"))?;
            rest = r;
            if !item.header.is_constructed() {
                continue;
            }
            for (t, f) in children(item.data, 2)? {
                let slot = if t == up {
                    &mut self.uplink
                } else if t == down {
                    &mut self.downlink
                } else {
                    continue;
                };
                let n = integer(f.data)?;
                *slot = Some(slot.unwrap_or(0).saturating_add(n));
            }
        }
        Ok(())
    }

    fn into_fields(self, kind: Kind) -> Fields {
        let (name, start) = match kind {
            Kind::MoCall => ("moCall", self.answer.or(self.seizure)),
            Kind::Sgw => ("sgw", self.opening),
            Kind::Pgw => ("pgw", self.opening),
            Kind::Smf => ("smf", self.opening),
        };
        let mut f = vec![("record_type".to_owned(), Value::Str(name.into()))];
        let mut put = |k: &str, v: Option<Value>| {
            if let Some(v) = v {
                f.push((k.to_owned(), v));
            }
        };
        put("record_type_id", self.record_type_id.map(Value::Int));
        put("imsi", self.imsi.map(Value::Str));
        put("msisdn", self.msisdn.map(Value::Str));
        put("imei", self.imei.map(Value::Str));
        put("calling_number", self.calling.map(Value::Str));
        put("called_number", self.called.map(Value::Str));
        put("start_time", start.map(Value::Str));
        put("duration_s", self.duration.map(Value::Int));
        put("cause_for_closing", self.cause.map(Value::Int));
        put("cell", self.cell.map(Value::Str));
        put("charging_id", self.charging_id);
        put("apn", self.apn.map(Value::Str));
        put("uplink_bytes", self.uplink.map(Value::Int));
        put("downlink_bytes", self.downlink.map(Value::Int));
        Fields(f)
    }
}

/// The contents of each element of a SEQUENCE OF.
fn items(list: &[u8]) -> Result<Vec<&[u8]>, String> {
    let mut out = Vec::new();
    let mut rest = list;
    while !rest.is_empty() {
        if rest.len() >= 2 && rest[0] == 0 && rest[1] == 0 {
            break;
        }
        let (r, item) = Any::from_ber(rest).map_err(|e| format!("BER: {e}"))?;
        rest = r;
        if item.header.is_constructed() {
            out.push(item.data);
        }
    }
    Ok(out)
}

/// UTF-8 text (UTF8String, IA5String).
fn text(b: &[u8]) -> Result<String, String> {
    String::from_utf8(b.to_vec()).map_err(|_| "not UTF-8 text".to_string())
}

/// A BER INTEGER (two's complement, big-endian) of at most 8 bytes (9 with a sign pad).
fn integer(b: &[u8]) -> Result<i64, String> {
    let b = if b.len() == 9 && b[0] == 0 { &b[1..] } else { b };
    if b.is_empty() || b.len() > 8 {
        return Err(format!("an INTEGER of {} bytes", b.len()));
    }
    let mut v: i64 = if b[0] & 0x80 != 0 { -1 } else { 0 };
    for &x in b {
        v = (v << 8) | i64::from(x);
    }
    Ok(v)
}

/// TBCD digits (low nibble first, 0xF filler), as IMSIs and IMEIs are coded.
fn tbcd(b: &[u8]) -> Result<String, String> {
    if b.is_empty() || b.len() > 10 {
        return Err(format!("TBCD of {} bytes", b.len()));
    }
    let mut s = String::with_capacity(b.len() * 2);
    for (i, &x) in b.iter().enumerate() {
        for (j, d) in [x & 0x0f, x >> 4].into_iter().enumerate() {
            match d {
                0..=9 => s.push(char::from(b'0' + d)),
                0xf if i == b.len() - 1 && j == 1 => {}
                _ => return Err(format!("TBCD digit {d:#x} at byte {i}")),
            }
        }
    }
    Ok(s)
}

/// An AddressString: one octet of nature of address / numbering plan, then TBCD digits.
fn address(b: &[u8]) -> Result<String, String> {
    match b {
        [] | [_] => Err(format!("an address of {} bytes", b.len())),
        [_, digits @ ..] => tbcd(digits),
    }
}

/// TimeStamp: 9 octets, YYMMDDhhmmss in BCD, a sign ('+'/'-') and hhmm in BCD.
fn timestamp(b: &[u8]) -> Result<String, String> {
    if b.len() != 9 {
        return Err(format!("a TimeStamp is 9 bytes, got {}", b.len()));
    }
    let bcd = |x: u8| -> Result<u8, String> {
        let (hi, lo) = (x >> 4, x & 0x0f);
        if hi > 9 || lo > 9 { Err(format!("BCD byte {x:#04x}")) } else { Ok(hi * 10 + lo) }
    };
    let sign = match b[6] {
        b'+' | b'-' => char::from(b[6]),
        x => return Err(format!("TimeStamp sign {x:#04x}")),
    };
    let [y, mo, d, h, mi, s] = [bcd(b[0])?, bcd(b[1])?, bcd(b[2])?, bcd(b[3])?, bcd(b[4])?, bcd(b[5])?];
    if !(1..=12).contains(&mo) || !(1..=31).contains(&d) || h > 23 || mi > 59 || s > 60 {
        return Err("TimeStamp out of range".into());
    }
    Ok(format!("20{y:02}-{mo:02}-{d:02}T{h:02}:{mi:02}:{s:02}{sign}{:02}:{:02}", bcd(b[7])?, bcd(b[8])?))
}

/// LocationAreaAndCell: `lac-ci`, both in decimal.
fn lac_ci(data: &[u8]) -> Result<String, String> {
    let (mut lac, mut ci) = (None, None);
    for (t, v) in children(data, 2)? {
        let n = v.data.iter().take(4).fold(0u32, |a, &x| (a << 8) | u32::from(x));
        match t {
            0 => lac = Some(n),
            1 => ci = Some(n),
            _ => {}
        }
    }
    match (lac, ci) {
        (Some(l), Some(c)) => Ok(format!("{l}-{c}")),
        _ => Err("locationAreaCode [0] and cellId [1] are both needed".into()),
    }
}

/// GTPv2 User Location Information: the E-UTRAN cell id (28 bits, hex) when an ECGI is there,
/// else the whole octet string in hex.
fn uli_cell(b: &[u8]) -> String {
    let Some(&flags) = b.first() else { return String::new() };
    // CGI, SAI, RAI are 7 octets each, TAI 5, then ECGI 7 (3 of PLMN, 4 of ECI).
    let mut at = 1;
    for (bit, len) in [(0, 7), (1, 7), (2, 7), (3, 5)] {
        if flags & (1 << bit) != 0 {
            at += len;
        }
    }
    if flags & (1 << 4) != 0 && b.len() >= at + 7 {
        let eci = u32::from_be_bytes([b[at + 3], b[at + 4], b[at + 5], b[at + 6]]) & 0x0fff_ffff;
        return format!("{eci:07x}");
    }
    hex(b)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn primitives() {
        assert_eq!(integer(&[0x01, 0x00]).unwrap(), 256);
        assert_eq!(integer(&[0xff]).unwrap(), -1);
        assert!(integer(&[]).is_err());
        assert_eq!(tbcd(&[0x00, 0x01, 0xf1]).unwrap(), "00101");
        assert!(tbcd(&[0xa0]).is_err());
        assert_eq!(address(&[0x91, 0x44, 0x77]).unwrap(), "4477");
        assert_eq!(
            timestamp(&[0x24, 0x03, 0x15, 0x12, 0x30, 0x05, b'+', 0x01, 0x00]).unwrap(),
            "2024-03-15T12:30:05+01:00"
        );
        assert!(timestamp(&[0x24, 0x13, 0x15, 0x12, 0x30, 0x05, b'+', 0x01, 0x00]).is_err());
    }

    #[test]
    fn short_or_inconsistent_files_are_refused() {
        assert!(decode_file(&[0; 10], 10).unwrap_err().contains("shorter than a file header"));
        let mut f = vec![0u8; 50];
        f[..4].copy_from_slice(&60u32.to_be_bytes());
        assert!(decode_file(&f, 10).unwrap_err().contains("header says 60 bytes"));
        f[..4].copy_from_slice(&50u32.to_be_bytes());
        f[4..8].copy_from_slice(&50u32.to_be_bytes());
        assert_eq!(decode_file(&f, 10).unwrap(), vec![], "an empty file with count 0");
    }
}
