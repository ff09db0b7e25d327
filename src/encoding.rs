//! How an SMS is encoded on the air and how many segments it takes (GSM 03.38 /
//! 3GPP TS 23.038 and 23.040).
//!
//! Text that fits the GSM 7-bit default alphabet goes as GSM-7: 160 septets in one
//! segment, 153 per segment when concatenated (the user data header takes the rest).
//! Characters of the extension table (`€`, `{`, `|`, …) take two septets (escape +
//! code), and an escape pair is never split across segments. Anything else makes the
//! whole message UCS-2: 70 UTF-16 units in one segment, 67 when concatenated, and a
//! surrogate pair (an emoji) is never split either.

use serde::Serialize;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Encoding {
    Gsm7,
    Ucs2,
}

/// The encoding and segment count of a message text.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Segmentation {
    pub encoding: Encoding,
    pub segments: u32,
}

/// The GSM 03.38 default alphabet (one septet each), in code order; 0x1B (escape) is
/// not a character of its own.
const GSM7_BASIC: &str = "@£$¥èéùìòÇ\nØø\rÅåΔ_ΦΓΛΩΠΨΣΘΞ\u{1b}ÆæßÉ !\"#¤%&'()*+,-./0123456789:;<=>?\
                          ¡ABCDEFGHIJKLMNOPQRSTUVWXYZÄÖÑÜ§¿abcdefghijklmnopqrstuvwxyzäöñüà";

/// The extension table reached through the escape: two septets each.
const GSM7_EXTENSION: &str = "\u{0c}^{}\\[~]|€";

const GSM7_SINGLE: u32 = 160;
const GSM7_CONCATENATED: u32 = 153;
const UCS2_SINGLE: u32 = 70;
const UCS2_CONCATENATED: u32 = 67;

/// Septets a character takes in GSM-7, or `None` when it has no GSM-7 form.
fn gsm7_septets(c: char) -> Option<u32> {
    if c != '\u{1b}' && GSM7_BASIC.contains(c) {
        Some(1)
    } else if GSM7_EXTENSION.contains(c) {
        Some(2)
    } else {
        None
    }
}

/// Segments for units of the given sizes: one segment when all fit in `single`,
/// otherwise packed in order into segments of `concatenated`, never splitting a unit.
fn segments(units: impl Iterator<Item = u32> + Clone, single: u32, concatenated: u32) -> u32 {
    if units.clone().sum::<u32>() <= single {
        return 1;
    }
    let (mut count, mut used) = (1, 0);
    for size in units {
        if used + size > concatenated {
            count += 1;
            used = 0;
        }
        used += size;
    }
    count
}

pub fn segment(text: &str) -> Segmentation {
    let septets: Option<Vec<u32>> = text.chars().map(gsm7_septets).collect();
    match septets {
        Some(septets) => Segmentation {
            encoding: Encoding::Gsm7,
            segments: segments(septets.into_iter(), GSM7_SINGLE, GSM7_CONCATENATED),
        },
        None => Segmentation {
            encoding: Encoding::Ucs2,
            segments: segments(
                text.chars().map(|c| c.len_utf16() as u32),
                UCS2_SINGLE,
                UCS2_CONCATENATED,
            ),
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn check(text: &str, encoding: Encoding, segments: u32) {
        assert_eq!(
            segment(text),
            Segmentation { encoding, segments },
            "{} chars: {text:?}",
            text.chars().count()
        );
    }

    #[test]
    fn gsm7_single_and_concatenated() {
        check("Hello", Encoding::Gsm7, 1);
        check(&"a".repeat(160), Encoding::Gsm7, 1);
        check(&"a".repeat(161), Encoding::Gsm7, 2);
        check(&"a".repeat(306), Encoding::Gsm7, 2);
        check(&"a".repeat(307), Encoding::Gsm7, 3);
        check(
            "@£$¥èéùìòÇØøÅåΔ_ΦΓΛΩΠΨΣΘΞÆæßÉ¡ÄÖÑÜ§¿äöñüà",
            Encoding::Gsm7,
            1,
        );
    }

    #[test]
    fn extension_characters_take_two_septets() {
        check(&"€".repeat(80), Encoding::Gsm7, 1);
        check(&"€".repeat(81), Encoding::Gsm7, 2);
        check(&"{".repeat(80), Encoding::Gsm7, 1);
        check(&format!("{}{{", "a".repeat(159)), Encoding::Gsm7, 2);
        // 152 septets then an escape pair: the pair moves to the second segment
        // instead of being split, and 153 more septets need a third.
        check(
            &format!("{}€{}", "a".repeat(152), "a".repeat(152)),
            Encoding::Gsm7,
            3,
        );
        check(
            &format!("{}€{}", "a".repeat(151), "a".repeat(153)),
            Encoding::Gsm7,
            2,
        );
    }

    #[test]
    fn ucs2_and_emoji() {
        check("Привет", Encoding::Ucs2, 1);
        check(&"ş".repeat(70), Encoding::Ucs2, 1);
        check(&"ş".repeat(71), Encoding::Ucs2, 2);
        check(&"ş".repeat(134), Encoding::Ucs2, 2);
        check(&"ş".repeat(135), Encoding::Ucs2, 3);
        // An emoji is a surrogate pair: two UTF-16 units, never split.
        check(&"😀".repeat(35), Encoding::Ucs2, 1);
        check(&"😀".repeat(36), Encoding::Ucs2, 2);
        check(&format!("{}😀", "ş".repeat(66)), Encoding::Ucs2, 1);
        check(&format!("{}😀", "ş".repeat(69)), Encoding::Ucs2, 2);
        check(
            &format!("{}😀{}", "ş".repeat(66), "ş".repeat(66)),
            Encoding::Ucs2,
            3,
        );
        // One non-GSM character makes the whole message UCS-2.
        check(&format!("{}ş", "a".repeat(69)), Encoding::Ucs2, 1);
        check(&format!("{}ş", "a".repeat(70)), Encoding::Ucs2, 2);
    }
}
