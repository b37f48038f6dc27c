//! Byte sizes as users write them (`512MiB`, `8GiB`, `1000000`) and as Runyard shows them.
//!
//! Binary units (`KiB`, `MiB`, `GiB`, `TiB`) are powers of 1024, decimal ones (`KB`, `MB`, `GB`,
//! `TB`) powers of 1000, a bare number is bytes. Parsing never panics and never overflows; the
//! canonical form (`format`) uses the largest binary unit that divides the size exactly, so a
//! size reads back as itself.

/// Parses a size: a number (decimals allowed) with an optional unit, case-insensitive, spaces
/// allowed before the unit. `512MiB`, `8GiB`, `1.5GiB`, `2GB`, `1048576`. The one parser of sizes
/// (spec fields and flags alike).
pub fn parse(s: &str) -> Result<u64, String> {
    let bad = |why: &str| {
        format!(
            "`{s}` is not a size ({why}): give a number with a unit, such as `512MiB` or \
             `8GiB` (KiB, MiB, GiB, TiB; KB, MB, GB, TB; or bytes)"
        )
    };
    let t = s.trim();
    let split = t
        .find(|c: char| !c.is_ascii_digit() && c != '.')
        .unwrap_or(t.len());
    let (number, unit) = (&t[..split], t[split..].trim());
    let (int, frac) = number.split_once('.').unwrap_or((number, ""));
    if int.is_empty() && frac.is_empty() {
        return Err(bad("no number"));
    }
    if frac.contains('.') {
        return Err(bad("more than one decimal point"));
    }
    let multiplier: u128 = match unit.to_ascii_lowercase().as_str() {
        "" | "b" => 1,
        "kb" => 1_000,
        "mb" => 1_000_000,
        "gb" => 1_000_000_000,
        "tb" => 1_000_000_000_000,
        "k" | "ki" | "kib" => 1 << 10,
        "m" | "mi" | "mib" => 1 << 20,
        "g" | "gi" | "gib" => 1 << 30,
        "t" | "ti" | "tib" => 1 << 40,
        _ => return Err(bad("unknown unit")),
    };
    let too_big = || bad("too large");
    let int: u128 = if int.is_empty() {
        0
    } else {
        int.parse().map_err(|_| too_big())?
    };
    let frac_digits = frac.trim_end_matches('0');
    let frac_value = if frac_digits.is_empty() {
        0
    } else {
        let digits: u32 = frac_digits.len().try_into().map_err(|_| too_big())?;
        let scale = 10u128.checked_pow(digits).ok_or_else(too_big)?;
        let f: u128 = frac_digits.parse().map_err(|_| too_big())?;
        f.checked_mul(multiplier).ok_or_else(too_big)? / scale
    };
    let bytes = int
        .checked_mul(multiplier)
        .and_then(|b| b.checked_add(frac_value))
        .ok_or_else(too_big)?;
    u64::try_from(bytes).map_err(|_| too_big())
}

/// The canonical form: `64MiB`, `8GiB`, or a number of bytes when no binary unit divides it.
pub fn format(bytes: u64) -> String {
    const UNITS: [(u64, &str); 4] = [
        (1 << 40, "TiB"),
        (1 << 30, "GiB"),
        (1 << 20, "MiB"),
        (1 << 10, "KiB"),
    ];
    for (size, unit) in UNITS {
        if bytes >= size && bytes.is_multiple_of(size) {
            return format!("{}{unit}", bytes / size);
        }
    }
    bytes.to_string()
}

/// Parses a size given as a JSON string (`"8GiB"`) or a number of bytes.
pub fn parse_value(v: &serde_json::Value) -> Result<u64, String> {
    match v {
        serde_json::Value::Number(n) => n
            .as_u64()
            .ok_or_else(|| format!("{n} is not a whole, positive number of bytes")),
        serde_json::Value::String(s) => parse(s),
        _ => Err("expected a size such as `512MiB`, `8GiB` or a number of bytes".into()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_parse_in_every_form() {
        assert_eq!(parse("512MiB"), Ok(512 << 20));
        assert_eq!(parse("8GiB"), Ok(8 << 30));
        assert_eq!(parse("8 gib"), Ok(8 << 30));
        assert_eq!(parse("2GB"), Ok(2_000_000_000));
        assert_eq!(parse("1048576"), Ok(1 << 20));
        assert_eq!(parse("64M"), Ok(64 << 20));
        assert_eq!(parse("1.5GiB"), Ok(1536 << 20));
        for bad in [
            "",
            "MiB",
            "-1GiB",
            "1.2.3GiB",
            "8 parsecs",
            "99999999999999999999",
            "16777216TiB",
        ] {
            let e = parse(bad).unwrap_err();
            assert!(e.contains("is not a size"), "{bad}: {e}");
        }
    }

    #[test]
    fn the_canonical_form_reads_back_as_itself() {
        for (bytes, text) in [
            (64 << 20, "64MiB"),
            (8 << 30, "8GiB"),
            (1536 << 20, "1536MiB"),
            (1000, "1000"),
            (3 << 10, "3KiB"),
            (0, "0"),
        ] {
            assert_eq!(format(bytes), text);
            assert_eq!(parse(text), Ok(bytes));
        }
        assert_eq!(parse_value(&serde_json::json!(4096)), Ok(4096));
        assert_eq!(parse_value(&serde_json::json!("1GiB")), Ok(1 << 30));
        assert!(parse_value(&serde_json::json!(-1)).is_err());
        assert!(parse_value(&serde_json::json!(true)).is_err());
    }
}
