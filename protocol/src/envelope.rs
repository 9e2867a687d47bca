//! The one envelope of every answer, on every channel: `{"ok":true,"data":...}` or
//! `{"ok":false,"kind":"...","error":"..."}`, one JSON object per line.
use crate::error::{ErrorKind, Failure};
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};

#[derive(Serialize, Deserialize)]
struct Wire<T> {
    ok: bool,
    #[serde(default = "none", skip_serializing_if = "Option::is_none")]
    data: Option<T>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    kind: Option<ErrorKind>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    error: Option<String>,
}

fn none<T>() -> Option<T> {
    None
}

/// One answer line, newline included.
pub fn encode_answer<T: Serialize>(answer: &Result<T, Failure>) -> Vec<u8> {
    let wire = match answer {
        Ok(data) => Wire {
            ok: true,
            data: Some(data),
            kind: None,
            error: None,
        },
        Err(f) => Wire {
            ok: false,
            data: None,
            kind: Some(f.kind),
            error: Some(f.message.clone()),
        },
    };
    let mut line = serde_json::to_vec(&wire).expect("answers serialize");
    line.push(b'\n');
    line
}

/// Reads one answer line. The outer error: the line is not an answer of this type (a peer of
/// another version, or not one of ours).
pub fn decode_answer<T: DeserializeOwned>(line: &[u8]) -> Result<Result<T, Failure>, String> {
    let wire: Wire<T> = serde_json::from_slice(line).map_err(|e| e.to_string())?;
    match (wire.ok, wire.data) {
        (true, Some(data)) => Ok(Ok(data)),
        // `"data": null` or none: fine for a type that has a null (unit, Option, Value).
        (true, None) => serde_json::from_value(serde_json::Value::Null)
            .map(Ok)
            .map_err(|_| "an `ok` answer without `data`".into()),
        (false, _) => Ok(Err(Failure {
            kind: wire.kind.unwrap_or(ErrorKind::Unknown),
            message: wire
                .error
                .unwrap_or_else(|| "refused, no reason given".into()),
        })),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn answers_round_trip() {
        let ok: Result<u32, Failure> = Ok(7);
        let line = encode_answer(&ok);
        assert_eq!(line, b"{\"ok\":true,\"data\":7}\n");
        assert_eq!(decode_answer::<u32>(&line).unwrap(), ok);
        let err: Result<u32, Failure> = Err(Failure::new(ErrorKind::Busy, "later"));
        let line = encode_answer(&err);
        assert_eq!(
            line,
            b"{\"ok\":false,\"kind\":\"busy\",\"error\":\"later\"}\n".to_vec()
        );
        assert_eq!(decode_answer::<u32>(&line).unwrap(), err);
        // The wrong type of data is an error, not a default.
        assert!(decode_answer::<u32>(b"{\"ok\":true,\"data\":\"x\"}").is_err());
        assert!(decode_answer::<u32>(b"{\"ok\":true}").is_err());
    }
}
