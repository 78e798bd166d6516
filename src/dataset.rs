//! Finding images on disk: plain image folders and the MVTec AD layout (`train/good`, `test/<type>`,
//! `ground_truth/<type>/<stem>_mask.png`, or the image's own name). Lists paths only; decoding is
//! `preprocess`'s job.

use std::path::{Path, PathBuf};

use crate::rng::SplitMix;

/// File extensions read as images (lower-case).
pub const IMAGE_EXTENSIONS: [&str; 6] = ["png", "jpg", "jpeg", "bmp", "tif", "tiff"];

#[derive(Debug, thiserror::Error)]
pub enum DatasetError {
    #[error("{path} does not exist")]
    Missing { path: PathBuf },
    #[error("cannot list {path}: {source}")]
    List {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{path} holds no images (looked for {})", IMAGE_EXTENSIONS.join(", "))]
    Empty { path: PathBuf },
}

/// Whether `path` names an image: an image extension, and not a hidden file (macOS's `._<name>`
/// sidecars in archives carry an image's name but no image).
pub fn is_image(path: &Path) -> bool {
    !is_hidden(path) && has_image_extension(path)
}

/// Whether `path` ends in one of [`IMAGE_EXTENSIONS`] (any letter case).
pub fn has_image_extension(path: &Path) -> bool {
    path.extension()
        .and_then(|e| e.to_str())
        .is_some_and(|e| IMAGE_EXTENSIONS.contains(&e.to_ascii_lowercase().as_str()))
}

/// Hidden files and folders (`.name`), and the `__MACOSX` folder of archives made on a Mac:
/// never images nor defect types.
fn is_hidden(path: &Path) -> bool {
    path.file_name()
        .is_some_and(|name| name.as_encoded_bytes().starts_with(b".") || name == "__MACOSX")
}

/// A file name as a case-insensitive key: ASCII letters lower-cased, every other byte kept (a
/// lossy conversion would give names in another code page one key).
fn name_key(name: &std::ffi::OsStr) -> Vec<u8> {
    name.as_encoded_bytes().to_ascii_lowercase()
}

/// The masks of one defect type's folder (`ground_truth/<type>`), listed once.
struct MaskFolder {
    dir: PathBuf,
    /// File name ([`name_key`]) → path.
    files: std::collections::HashMap<Vec<u8>, PathBuf>,
}

impl MaskFolder {
    /// The files of `dir` (none where it does not exist: each mask is then reported missing).
    fn list(dir: &Path) -> Result<Self, DatasetError> {
        let list_error = |source| DatasetError::List {
            path: dir.to_path_buf(),
            source,
        };
        let entries = match std::fs::read_dir(dir) {
            Ok(entries) => entries.collect::<Result<Vec<_>, _>>().map_err(list_error)?,
            Err(error) if error.kind() == std::io::ErrorKind::NotFound => Vec::new(),
            Err(error) => return Err(list_error(error)),
        };
        let files = entries
            .into_iter()
            .map(|entry| entry.path())
            .filter(|path| path.is_file())
            .filter_map(|path| Some((name_key(path.file_name()?), path)))
            .collect();
        Ok(Self {
            dir: dir.to_path_buf(),
            files,
        })
    }

    /// The mask of test image `image`: `<stem>_mask.png` (MVTec AD), else `<stem>.png` (the
    /// image's own name, as BTAD and VisA's MVTec-style splits have it), else either with another
    /// image extension (`_mask` first); letter case aside.
    fn find(&self, image: &Path) -> Option<PathBuf> {
        let stem = name_key(image.file_stem()?);
        let names = [[stem.as_slice(), b"_mask"].concat(), stem.clone()];
        let with = |name: &[u8], ext: &str| [name, b".", ext.as_bytes()].concat();
        let png = names.iter().map(|name| with(name, "png"));
        let others = names.iter().flat_map(|name| {
            IMAGE_EXTENSIONS
                .iter()
                .filter(|&&ext| ext != "png")
                .map(move |ext| with(name, ext))
        });
        png.chain(others)
            .find_map(|name| self.files.get(&name).cloned())
    }
}

/// Image files directly inside `dir`, sorted by name.
pub fn images_in(dir: &Path) -> Result<Vec<PathBuf>, DatasetError> {
    if !dir.exists() {
        return Err(DatasetError::Missing {
            path: dir.to_path_buf(),
        });
    }
    let entries = std::fs::read_dir(dir).map_err(|source| DatasetError::List {
        path: dir.to_path_buf(),
        source,
    })?;
    let mut images: Vec<PathBuf> = entries
        .filter_map(|entry| entry.ok().map(|e| e.path()))
        .filter(|path| path.is_file() && is_image(path))
        .collect();
    images.sort();
    Ok(images)
}

/// The training images `stpm train` takes from `dir` ([`training_images`]), at most `max_images`
/// of them (0: all), and how many the folder held. `stpm export` makes the same choice to find
/// the held-out images again.
#[derive(Debug, Clone)]
pub struct TrainingSelection {
    pub folder: PathBuf,
    /// Images in the folder.
    pub found: usize,
    /// The images used: all, or `max_images` of them evenly spaced in name order.
    pub paths: Vec<PathBuf>,
}

pub fn training_selection(
    dir: &Path,
    max_images: usize,
) -> Result<TrainingSelection, DatasetError> {
    let (folder, paths) = training_images(dir)?;
    let found = paths.len();
    let paths = if max_images > 0 && found > max_images {
        evenly_spaced(found, max_images)
            .into_iter()
            .map(|index| paths[index].clone())
            .collect()
    } else {
        paths
    };
    Ok(TrainingSelection {
        folder,
        found,
        paths,
    })
}

/// The defect-free training images of `dir`: `dir/train/good` for an MVTec category, else the
/// images directly in `dir`. Returns the folder used and its images.
pub fn training_images(dir: &Path) -> Result<(PathBuf, Vec<PathBuf>), DatasetError> {
    let train = dir.join("train");
    let folder = GOOD_FOLDERS
        .iter()
        .map(|name| train.join(name))
        .find(|folder| folder.is_dir())
        .unwrap_or_else(|| dir.to_path_buf());
    let images = images_in(&folder)?;
    if images.is_empty() {
        return Err(DatasetError::Empty { path: folder });
    }
    Ok((folder, images))
}

/// Names of the good images' folder under `train/` and `test/`, in order of preference: MVTec AD's,
/// then BTAD's (whose defects are in `ko`).
const GOOD_FOLDERS: [&str; 2] = ["good", "ok"];

/// One test image of an MVTec-layout category.
#[derive(Debug, Clone)]
pub struct TestImage {
    pub path: PathBuf,
    /// `good` (also for a `test/ok` folder), or the defect type (the folder name under `test/`).
    pub defect_type: String,
    /// Ground-truth mask (defect images only).
    pub mask: Option<PathBuf>,
}

impl TestImage {
    pub fn is_anomalous(&self) -> bool {
        self.defect_type != "good"
    }
}

#[derive(Debug, thiserror::Error)]
pub enum LayoutError {
    #[error(
        "{dir} is not an MVTec-layout category: {problem}. Expected test/good/*.png, test/<defect_type>/*.png and ground_truth/<defect_type>/<stem>_mask.png"
    )]
    Layout { dir: PathBuf, problem: String },
    #[error(
        "no ground-truth mask for {image}: expected {mask} (or the image's own name with .png or another image extension)"
    )]
    MissingMask { image: PathBuf, mask: PathBuf },
    #[error(transparent)]
    Dataset(#[from] DatasetError),
}

/// Every test image of an MVTec-layout category, good ones first, then defect types by name.
pub fn test_set(dir: &Path) -> Result<Vec<TestImage>, LayoutError> {
    let test = dir.join("test");
    if !test.is_dir() {
        return Err(LayoutError::Layout {
            dir: dir.to_path_buf(),
            problem: "there is no test/ folder".into(),
        });
    }
    let entries = std::fs::read_dir(&test).map_err(|source| DatasetError::List {
        path: test.clone(),
        source,
    })?;
    let mut types: Vec<String> = entries
        .filter_map(|e| e.ok())
        .filter(|e| e.path().is_dir() && !is_hidden(&e.path()))
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .collect();
    let Some(good) = GOOD_FOLDERS
        .into_iter()
        .find(|name| types.iter().any(|t| t == name))
    else {
        return Err(LayoutError::Layout {
            dir: dir.to_path_buf(),
            problem: "test/good (or BTAD's test/ok) is missing".into(),
        });
    };
    types.sort_by_key(|name| (name != good, name.clone()));
    let mut images = Vec::new();
    for folder in types {
        let defect_type = if folder == good { "good" } else { &folder };
        let masks = match defect_type {
            "good" => None,
            _ => Some(MaskFolder::list(
                &dir.join("ground_truth").join(defect_type),
            )?),
        };
        for path in images_in(&test.join(&folder))? {
            let mask = match &masks {
                None => None,
                Some(masks) => Some(masks.find(&path).ok_or_else(|| {
                    let stem = path.file_stem().unwrap_or_default().to_string_lossy();
                    LayoutError::MissingMask {
                        mask: masks.dir.join(format!("{stem}_mask.png")),
                        image: path.clone(),
                    }
                })?),
            };
            images.push(TestImage {
                path,
                defect_type: defect_type.to_string(),
                mask,
            });
        }
    }
    if !images.iter().any(|image| image.is_anomalous()) {
        return Err(LayoutError::Layout {
            dir: dir.to_path_buf(),
            problem: "no defect images under test/".into(),
        });
    }
    Ok(images)
}

/// Share of the training images held out for checkpointing and calibration (not recorded in the
/// manifest: `stpm export` reproduces the split from it, the images [`training_selection`] chose
/// and the seed).
pub const DEFAULT_HOLDOUT_FRACTION: f64 = 0.2;

/// `most` indices of `0..count` spread evenly from first to last (all of them when `count` ≤
/// `most`), ascending.
pub fn evenly_spaced(count: usize, most: usize) -> Vec<usize> {
    if count <= most {
        return (0..count).collect();
    }
    (0..most).map(|k| k * count / most).collect()
}

/// Splits `count` items into (train, holdout) index lists, shuffled with `seed`.
pub fn split_holdout(count: usize, fraction: f64, seed: u64) -> (Vec<usize>, Vec<usize>) {
    let mut order: Vec<usize> = (0..count).collect();
    shuffle(&mut order, &mut SplitMix::new(seed));
    let holdout =
        ((count as f64 * fraction).round() as usize).clamp(1, count.saturating_sub(1).max(1));
    let (held, train) = order.split_at(holdout);
    let (mut train, mut held) = (train.to_vec(), held.to_vec());
    train.sort_unstable();
    held.sort_unstable();
    (train, held)
}

/// Fisher–Yates with our own generator (stable across dependency versions).
pub fn shuffle(indices: &mut [usize], rng: &mut SplitMix) {
    for i in (1..indices.len()).rev() {
        let j = (rng.next_u64() % (i as u64 + 1)) as usize;
        indices.swap(i, j);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn evenly_spaced_indices_cover_the_whole_range_once() {
        assert_eq!(evenly_spaced(3, 5), vec![0, 1, 2]);
        assert_eq!(evenly_spaced(10, 4), vec![0, 2, 5, 7]);
        let picked = evenly_spaced(100_000, 1000);
        assert_eq!(picked.len(), 1000);
        assert!(
            picked.windows(2).all(|w| w[1] - w[0] == 100),
            "evenly, ascending"
        );
        assert_eq!((picked[0], picked[999]), (0, 99_900));
    }

    #[test]
    fn holdout_split_is_deterministic_disjoint_and_twenty_percent() {
        let (train, held) = split_holdout(150, 0.2, 5);
        assert_eq!(held.len(), 30);
        assert_eq!(train.len(), 120);
        assert!(held.iter().all(|i| !train.contains(i)));
        assert_eq!(split_holdout(150, 0.2, 5), (train, held.clone()));
        assert_ne!(split_holdout(150, 0.2, 6).1, held);
    }

    #[test]
    fn holdout_keeps_one_image_each_side_for_tiny_sets() {
        let (train, held) = split_holdout(2, 0.2, 0);
        assert_eq!((train.len(), held.len()), (1, 1));
    }

    #[test]
    fn prefers_mvtec_train_good_and_sorts() {
        let dir = tempfile::tempdir().expect("dir");
        let good = dir.path().join("train/good");
        std::fs::create_dir_all(&good).expect("mkdir");
        for name in ["b.png", "a.JPG", "notes.txt"] {
            std::fs::write(good.join(name), b"x").expect("write");
        }
        let (folder, images) = training_images(dir.path()).expect("images");
        assert_eq!(folder, good);
        let names: Vec<_> = images
            .iter()
            .map(|p| p.file_name().unwrap().to_string_lossy().into_owned())
            .collect();
        assert_eq!(names, vec!["a.JPG", "b.png"]);
    }

    #[test]
    fn hidden_files_and_archive_folders_are_not_images_nor_types() {
        let dir = tempfile::tempdir().expect("dir");
        for folder in [
            "test/good",
            "test/crack",
            "ground_truth/crack",
            "test/__MACOSX",
            "test/.ipynb_checkpoints",
        ] {
            std::fs::create_dir_all(dir.path().join(folder)).expect("mkdir");
        }
        for file in [
            "test/good/000.png",
            "test/good/._000.png",
            "test/crack/001.png",
            "test/crack/.001.png",
            "ground_truth/crack/001_mask.png",
            "test/__MACOSX/002.png",
            "test/.ipynb_checkpoints/003.png",
        ] {
            std::fs::write(dir.path().join(file), b"x").expect("write");
        }
        let images = test_set(dir.path()).expect("layout");
        let listed: Vec<(String, String)> = images
            .iter()
            .map(|image| {
                let name = image.path.file_name().unwrap_or_default();
                (image.defect_type.clone(), name.to_string_lossy().into())
            })
            .collect();
        assert_eq!(
            listed,
            [
                ("good".to_string(), "000.png".to_string()),
                ("crack".to_string(), "001.png".to_string())
            ]
        );
    }

    #[test]
    fn masks_of_names_outside_utf8_are_told_apart() {
        use std::ffi::OsStr;
        use std::os::unix::ffi::OsStrExt;
        let dir = tempfile::tempdir().expect("dir");
        for folder in ["test/good", "test/crack", "ground_truth/crack"] {
            std::fs::create_dir_all(dir.path().join(folder)).expect("mkdir");
        }
        std::fs::write(dir.path().join("test/good/000.png"), b"x").expect("write");
        // Latin-1 names (an archive from another code page): é and à are not UTF-8 here.
        for stem in [&b"\xe9x"[..], &b"\xe0x"[..]] {
            let image = [stem, b".png"].concat();
            let mask = [stem, b"_mask.png"].concat();
            let test = dir
                .path()
                .join("test/crack")
                .join(OsStr::from_bytes(&image));
            let truth = dir.path().join("ground_truth/crack");
            std::fs::write(test, b"x").expect("image");
            std::fs::write(truth.join(OsStr::from_bytes(&mask)), b"x").expect("mask");
        }
        let images = test_set(dir.path()).expect("layout");
        let pairs: Vec<(Vec<u8>, Vec<u8>)> = images[1..]
            .iter()
            .map(|image| {
                let stem = image.path.file_stem().unwrap_or_default().as_bytes();
                let mask = image.mask.as_deref().and_then(Path::file_name);
                (stem.to_vec(), mask.unwrap_or_default().as_bytes().to_vec())
            })
            .collect();
        assert_eq!(pairs.len(), 2);
        for (stem, mask) in pairs {
            assert_eq!(mask, [&stem[..], b"_mask.png"].concat());
        }
    }

    #[test]
    fn missing_mask_is_named() {
        let dir = tempfile::tempdir().expect("dir");
        for folder in ["test/good", "test/crack", "ground_truth/crack"] {
            std::fs::create_dir_all(dir.path().join(folder)).expect("mkdir");
        }
        std::fs::write(dir.path().join("test/good/000.png"), b"x").expect("write");
        std::fs::write(dir.path().join("test/crack/007.png"), b"x").expect("write");
        let error = test_set(dir.path()).expect_err("no mask");
        assert!(
            error
                .to_string()
                .contains("ground_truth/crack/007_mask.png"),
            "{error}"
        );
        // A mask with the image's own name (BTAD, VisA's MVTec-style split) is taken; MVTec's
        // `_mask.png` wins where both are there; extensions and letter case may differ.
        std::fs::write(dir.path().join("ground_truth/crack/007.PNG"), b"x").expect("write");
        let images = test_set(dir.path()).expect("layout");
        assert_eq!(images.len(), 2);
        assert!(!images[0].is_anomalous() && images[1].is_anomalous());
        let mask = |images: &[TestImage]| images[1].mask.clone().unwrap_or_default();
        assert!(mask(&images).ends_with("ground_truth/crack/007.PNG"));
        std::fs::write(dir.path().join("ground_truth/crack/007_mask.png"), b"x").expect("write");
        let images = test_set(dir.path()).expect("layout");
        assert!(mask(&images).ends_with("ground_truth/crack/007_mask.png"));
        std::fs::write(dir.path().join("test/crack/008.bmp"), b"x").expect("write");
        std::fs::write(dir.path().join("ground_truth/crack/008_mask.bmp"), b"x").expect("write");
        let images = test_set(dir.path()).expect("layout");
        assert!(
            images[2]
                .mask
                .clone()
                .unwrap_or_default()
                .ends_with("008_mask.bmp")
        );
    }

    #[test]
    fn btad_names_its_good_folders_ok() {
        let dir = tempfile::tempdir().expect("dir");
        for folder in ["train/ok", "test/ok", "test/ko", "ground_truth/ko"] {
            std::fs::create_dir_all(dir.path().join(folder)).expect("mkdir");
        }
        for file in ["train/ok/0000.bmp", "test/ok/0001.bmp", "test/ko/0002.bmp"] {
            std::fs::write(dir.path().join(file), b"x").expect("write");
        }
        std::fs::write(dir.path().join("ground_truth/ko/0002.png"), b"x").expect("write");
        let (folder, images) = training_images(dir.path()).expect("training images");
        assert_eq!(folder, dir.path().join("train/ok"));
        assert_eq!(images.len(), 1);
        let test = test_set(dir.path()).expect("test set");
        let kinds: Vec<_> = test.iter().map(|t| t.defect_type.as_str()).collect();
        assert_eq!(kinds, vec!["good", "ko"]);
        assert!(test[0].path.ends_with("test/ok/0001.bmp") && !test[0].is_anomalous());
        // Where both are there, `good` is the good folder and `ok` a defect type like any other.
        std::fs::create_dir_all(dir.path().join("test/good")).expect("mkdir");
        std::fs::write(dir.path().join("test/good/0003.png"), b"x").expect("write");
        std::fs::create_dir_all(dir.path().join("ground_truth/ok")).expect("mkdir");
        std::fs::write(dir.path().join("ground_truth/ok/0001_mask.png"), b"x").expect("write");
        let kinds: Vec<_> = test_set(dir.path())
            .expect("test set")
            .into_iter()
            .map(|t| t.defect_type)
            .collect();
        assert_eq!(kinds, vec!["good", "ko", "ok"]);
    }

    #[test]
    fn empty_folder_is_an_error_naming_it() {
        let dir = tempfile::tempdir().expect("dir");
        let error = training_images(dir.path()).expect_err("empty");
        assert!(
            error
                .to_string()
                .contains(&dir.path().display().to_string()),
            "{error}"
        );
    }
}
